#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <set>

#include "fetch_internal.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/fetch/fetch.hpp"

namespace unimsg {
namespace {

std::string lowercase(std::string_view text) {
  std::string out(text);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string scheme_of(std::string_view url) {
  const auto end = url.find("://");
  return end == std::string_view::npos ? "" : lowercase(url.substr(0, end));
}

// "a=1&b" -> "a=***&b": every value may be a token or a signature (pre-signed URLs).
std::string redact_query(std::string_view query) {
  std::string out;
  std::size_t start = 0;
  while (start <= query.size()) {
    const auto end = std::min(query.find('&', start), query.size());
    const std::string_view pair = query.substr(start, end - start);
    const auto equals = pair.find('=');
    out += equals == std::string_view::npos ? std::string(pair)
                                            : std::string(pair.substr(0, equals + 1)) + "***";
    if (end == query.size()) break;
    out += '&';
    start = end + 1;
  }
  return out;
}

}  // namespace

namespace detail {

bool is_sha256(const std::string& text) {
  return text.size() == 64 && std::all_of(text.begin(), text.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string redact_text(std::string text, std::string_view url) {
  const std::string redacted = redact_url(url);
  if (redacted == url) return text;
  const auto replace_all = [&text](std::string_view what, std::string_view with) {
    if (what.empty()) return;
    for (auto at = text.find(what); at != std::string::npos;
         at = text.find(what, at + with.size())) {
      text.replace(at, what.size(), with);
    }
  };
  replace_all(url, redacted);
  // libcurl may quote a part of the URL (the host with its user info, the query) on its own.
  const auto authority = url.find("://") == std::string_view::npos ? 0 : url.find("://") + 3;
  const auto at = url.find('@', authority);
  const auto path = url.find_first_of("/?#", authority);
  if (at != std::string_view::npos && (path == std::string_view::npos || at < path)) {
    const auto colon = url.find(':', authority);
    if (colon != std::string_view::npos && colon < at) {
      replace_all(url.substr(colon + 1, at - colon - 1), "***");
    }
  }
  const auto question = url.find('?');
  if (question != std::string_view::npos) {
    const auto query = url.substr(question + 1, url.find('#', question) - question - 1);
    replace_all(query, redact_query(query));
  }
  return text;
}

}  // namespace detail

std::string redact_url(std::string_view url) {
  const auto scheme_end = url.find("://");
  const std::size_t authority = scheme_end == std::string_view::npos ? 0 : scheme_end + 3;
  const auto authority_end = std::min(url.find_first_of("/?#", authority), url.size());
  std::string out(url.substr(0, authority));
  const std::string_view host_part = url.substr(authority, authority_end - authority);
  const auto at = host_part.rfind('@');
  if (at == std::string_view::npos) {
    out += host_part;
  } else {
    const std::string_view user_info = host_part.substr(0, at);
    const auto colon = user_info.find(':');
    out += colon == std::string_view::npos ? std::string(user_info)
                                           : std::string(user_info.substr(0, colon)) + ":***";
    out += host_part.substr(at);
  }
  const std::string_view rest = url.substr(authority_end);
  const auto question = rest.find('?');
  if (question == std::string_view::npos) return out + std::string(rest);
  const auto fragment = std::min(rest.find('#', question), rest.size());
  out += rest.substr(0, question + 1);
  out += redact_query(rest.substr(question + 1, fragment - question - 1));
  out += rest.substr(fragment);
  return out;
}

std::string allowed_redirect_protocols(std::string_view url) {
  return scheme_of(url) == "https" ? "https" : "http,https";
}

std::vector<FetchSpec> parse_manifest(std::string_view json_text) {
  nlohmann::json document;
  try {
    document = nlohmann::json::parse(json_text);
  } catch (const std::exception& error) {
    throw ConfigError(kNoRank, "manifest", std::string("not valid JSON: ") + error.what());
  }
  if (!document.is_object() || !document.contains("files") || !document["files"].is_array()) {
    throw ConfigError(kNoRank, "manifest", "expected an object with a \"files\" array");
  }
  std::vector<FetchSpec> specs;
  std::set<std::string> names;
  std::size_t index = 0;
  for (const auto& entry : document["files"]) {
    const std::string where = "manifest: files[" + std::to_string(index++) + "]";
    if (!entry.is_object()) throw ConfigError(kNoRank, where, "is not an object");
    const auto text = [&](const char* field) {
      if (!entry.contains(field) || !entry[field].is_string() ||
          entry[field].get<std::string>().empty()) {
        throw ConfigError(kNoRank, where,
                          std::string("\"") + field + "\" is missing or not a non-empty string");
      }
      return entry[field].get<std::string>();
    };
    FetchSpec spec{text("name"), text("url"), text("sha256"), std::nullopt};
    if (!detail::is_sha256(spec.sha256)) {
      throw ConfigError(kNoRank, where + " (" + spec.name + ")",
                        "\"sha256\" must be 64 lowercase hex digits, got '" + spec.sha256 + "'");
    }
    const std::string scheme = spec.url.substr(0, std::min(spec.url.find("://"), spec.url.size()));
    if (scheme != "http" && scheme != "https" && scheme != "file") {
      throw ConfigError(
          kNoRank, where + " (" + spec.name + ")",
          "\"url\" must be http://, https:// or file://, got '" + redact_url(spec.url) + "'");
    }
    if (entry.contains("size")) {
      if (!entry["size"].is_number_unsigned()) {
        throw ConfigError(kNoRank, where + " (" + spec.name + ")",
                          "\"size\" must be a non-negative integer");
      }
      spec.size = entry["size"].get<std::uint64_t>();
    }
    if (!names.insert(spec.name).second) {
      throw ConfigError(kNoRank, where, "the name '" + spec.name + "' is used twice");
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

}  // namespace unimsg
