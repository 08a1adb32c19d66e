// Events: what a rank reports with Monitor::event(), checked on rank 0 before the page and
// metrics.jsonl show it, and the launcher's events.jsonl, which rank 0 reads at start so that
// the page shows the launches and failures that led to this run.

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <exception>
#include <fstream>
#include <optional>
#include <string_view>
#include <vector>

#include "monitor_internal.hpp"
#include "unimsg/monitor/monitor.hpp"

namespace unimsg {
namespace {

// The length of the well-formed UTF-8 character at the start of `text` (RFC 3629: no overlong
// forms, no surrogates, nothing past U+10FFFF), 0 if there is none.
std::size_t utf8_length(std::string_view text) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  if (lead < 0x80) return 1;
  std::size_t length = 0;
  unsigned char low = 0x80, high = 0xBF;  // the second byte's range
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return 0;
  }
  if (text.size() < length || byte(1) < low || byte(1) > high) return 0;
  for (std::size_t i = 2; i < length; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  }
  return length;
}

using detail::kMaxEventKind;
using detail::kMaxEventText;
using nlohmann::json;

// A launcher event (events.jsonl) as the page shows it; nullopt for lines it cannot read.
std::optional<StatusEvent> launcher_event(const std::string& line) {
  const json event = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!event.is_object()) return std::nullopt;
  const auto kind = event.find("event");
  const auto time = event.find("time");
  if (kind == event.end() || !kind->is_string() || time == event.end() || !time->is_number()) {
    return std::nullopt;
  }
  const auto field = [&](const char* key) {
    const auto it = event.find(key);
    return it == event.end() ? std::string()
                             : (it->is_string() ? it->get<std::string>() : it->dump());
  };
  StatusEvent out{time->get<double>(), kind->get<std::string>(), ""};
  if (out.kind == "launch") {
    out.text = "launch " + std::to_string(event.value("restart", 0) + 1) + " on " +
               field("world_size") + " rank(s)";
  } else if (out.kind == "failure") {
    out.text = field("reason");
    if (const auto ranks = field("lost_ranks"); !ranks.empty() && ranks != "[]") {
      out.text += " (lost ranks " + ranks + ")";
    }
    if (const auto hosts = field("lost_hosts"); !hosts.empty() && hosts != "[]") {
      out.text += " (lost hosts " + hosts + ")";
    }
  } else if (out.kind == "rerank") {
    out.text = "re-ranked from " + field("from") + " to " + field("world_size") + " rank(s)";
  } else if (out.kind == "restart") {
    out.text = "relaunched on " + field("world_size") + " rank(s)";
  } else {
    out.text = field("reason");
  }
  out.text = detail::clean_utf8(out.text, kMaxEventText);
  return out;
}

}  // namespace

std::string detail::clean_utf8(std::string_view text, std::size_t max_bytes) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  std::string out;
  out.reserve(std::min(text.size(), max_bytes));
  while (!text.empty()) {
    const std::size_t length = utf8_length(text);
    const std::string_view next = length > 0 ? text.substr(0, length) : kReplacement;
    if (out.size() + next.size() > max_bytes) break;
    out += next;
    text.remove_prefix(length > 0 ? length : 1);
  }
  return out;
}

std::string detail::dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

void Monitor::event(std::string kind, std::string text) {
  kind = detail::clean_utf8(kind, kMaxEventKind);
  text = detail::clean_utf8(text, kMaxEventText);
  if (bus_.rank() == 0) {
    handle_event(0, std::move(kind), std::move(text));
    return;
  }
  try {
    bus_.send(
        0, Message::make(Kind::kStatus, kStatusEventTopic,
                         Payload::from_string(detail::dump(json{{"kind", kind}, {"text", text}}))));
  } catch (const std::exception& error) {
    log_->warn("monitor: event not sent: {}", error.what());
  }
}

void Monitor::on_event(const Message& message) {
  const json event = json::parse(message.payload.as_string(), nullptr, false);
  const auto valid_string = [&](const char* key, std::size_t limit) {
    const auto it = event.is_object() ? event.find(key) : event.end();
    return it != event.end() && it->is_string() &&
           it->get_ref<const std::string&>().size() <= limit;
  };
  if (!valid_string("kind", kMaxEventKind) || !valid_string("text", kMaxEventText)) {
    log_->warn("monitor: ignored a malformed event from rank {}", message.header.source);
    return;
  }
  handle_event(message.header.source, event.at("kind").get<std::string>(),
               event.at("text").get<std::string>());
}

void Monitor::handle_event(int source, std::string kind, std::string text) {
  const double now = detail::unix_now();
  text = "rank " + std::to_string(source) + ": " + text;
  log_->debug("monitor: event {}: {}", kind, text);  // (its sender logs it)
  record(detail::dump(
      json{{"type", "event"}, {"time", now}, {"kind", kind}, {"rank", source}, {"text", text}}));
  board_->add_event({now, std::move(kind), std::move(text)});
}

void Monitor::load_launcher_events() {
  std::ifstream in(options_.run_dir / "events.jsonl");
  std::string line;
  std::vector<StatusEvent> events;
  std::size_t unreadable = 0;
  while (std::getline(in, line)) {
    if (auto event = launcher_event(line)) {
      events.push_back(std::move(*event));
    } else if (!line.empty()) {
      ++unreadable;
    }
  }
  if (unreadable > 0) {
    log_->warn("monitor: {} unreadable line(s) in {}", unreadable,
               (options_.run_dir / "events.jsonl").string());
  }
  const std::size_t keep = std::min(events.size(), StatusBoard::kEventsKept);
  for (std::size_t i = events.size() - keep; i < events.size(); ++i) {
    board_->add_event(std::move(events[i]));
  }
}

}  // namespace unimsg
