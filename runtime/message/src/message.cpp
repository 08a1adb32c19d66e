#include "unimsg/message/message.hpp"

#if defined(__x86_64__)
// Runtime dispatch to the widest vector unit (SSE2/AVX2/AVX-512): several times faster than the
// baseline build on bulk payloads (docs/architecture.md, The envelope). Small inputs take the inlined scalar code below instead: there the
// call through the dispatcher costs as much as the hash.
#define XXH_DISPATCH_DISABLE_REPLACE 1
#include <xxh_x86dispatch.h>
#endif
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <zstd.h>

#include <bit>
#include <cstring>
#include <stdexcept>
#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

static_assert(std::endian::native == std::endian::little ||
              std::endian::native == std::endian::big);

// Header layout (little-endian, 64 bytes).
constexpr std::size_t kOffMagic = 0;
constexpr std::size_t kOffVersion = 4;
constexpr std::size_t kOffKind = 6;
constexpr std::size_t kOffPriority = 7;
constexpr std::size_t kOffFlags = 8;
constexpr std::size_t kOffTopic = 12;
constexpr std::size_t kOffSource = 16;
constexpr std::size_t kOffDestination = 20;
constexpr std::size_t kOffSequence = 24;
constexpr std::size_t kOffCorrelation = 32;
constexpr std::size_t kOffTimestamp = 40;
constexpr std::size_t kOffPayloadLength = 48;
constexpr std::size_t kOffChecksum = 56;
static_assert(kOffChecksum + 8 == kHeaderSize);

template <typename T>
void store_le(std::byte* out, T value) {
  using U = std::make_unsigned_t<T>;
  auto bits = static_cast<U>(value);
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(out, &bits, sizeof(U));  // one store instead of a byte loop
  } else {
    for (std::size_t i = 0; i < sizeof(T); ++i) {
      out[i] = static_cast<std::byte>(bits & 0xFFu);
      bits = static_cast<U>(bits >> 8);
    }
  }
}

template <typename T>
T load_le(const std::byte* in) {
  using U = std::make_unsigned_t<T>;
  U bits = 0;
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(&bits, in, sizeof(U));
  } else {
    for (std::size_t i = sizeof(T); i-- > 0;) {
      bits = static_cast<U>((bits << 8) | static_cast<U>(in[i]));
    }
  }
  return static_cast<T>(bits);
}

// The checksum covers the header fields before it and the payload, so that a damaged topic or
// rank is caught as surely as a damaged payload.
std::uint64_t compute_checksum(const std::byte* header_bytes, std::span<const std::byte> payload) {
  // XXH3 switches to its vectorised loop above 240 bytes.
  constexpr std::size_t kInlineLimit = 240;
  const XXH64_hash_t header_hash = XXH3_64bits(header_bytes, kOffChecksum);
#if defined(__x86_64__)
  if (payload.size() > kInlineLimit) {
    return XXH3_64bits_withSeed_dispatch(payload.data(), payload.size(), header_hash);
  }
#endif
  return XXH3_64bits_withSeed(payload.data(), payload.size(), header_hash);
}

std::string hex(std::uint64_t value) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text = "0x";
  bool started = false;
  for (int shift = 60; shift >= 0; shift -= 4) {
    const auto digit = static_cast<unsigned>((value >> shift) & 0xF);
    if (digit != 0 || started || shift == 0) {
      text += kDigits[digit];
      started = true;
    }
  }
  return text;
}

bool is_known_kind(std::uint8_t value) {
  return value >= static_cast<std::uint8_t>(Kind::kControl) &&
         value <= static_cast<std::uint8_t>(Kind::kUser);
}

}  // namespace

const char* to_string(Kind kind) noexcept {
  switch (kind) {
    case Kind::kControl:
      return "Control";
    case Kind::kNegotiation:
      return "Negotiation";
    case Kind::kHeartbeat:
      return "Heartbeat";
    case Kind::kStatus:
      return "Status";
    case Kind::kFault:
      return "Fault";
    case Kind::kCheckpoint:
      return "Checkpoint";
    case Kind::kData:
      return "Data";
    case Kind::kTask:
      return "Task";
    case Kind::kTaskResult:
      return "TaskResult";
    case Kind::kUser:
      return "User";
  }
  return "Unknown";
}

Priority default_priority(Kind kind) noexcept {
  switch (kind) {
    case Kind::kFault:
    case Kind::kHeartbeat:
      return Priority::kCritical;
    case Kind::kControl:
    case Kind::kNegotiation:
      return Priority::kHigh;
    case Kind::kData:
      return Priority::kLow;
    default:
      return Priority::kNormal;
  }
}

const char* to_string(Priority priority) noexcept {
  switch (priority) {
    case Priority::kLow:
      return "low";
    case Priority::kNormal:
      return "normal";
    case Priority::kHigh:
      return "high";
    case Priority::kCritical:
      return "critical";
  }
  return "unknown";
}

Payload::Payload(std::vector<std::byte> bytes) {
  auto owner = std::make_shared<const std::vector<std::byte>>(std::move(bytes));
  data_ = owner->data();
  size_ = owner->size();
  owner_ = std::move(owner);
}

Payload::Payload(std::shared_ptr<const void> owner, std::span<const std::byte> bytes)
    : owner_(std::move(owner)), data_(bytes.data()), size_(bytes.size()) {}

Payload Payload::slice(std::size_t offset, std::size_t size) const {
  if (offset > size_ || size > size_ - offset) {
    throw std::out_of_range("Payload::slice out of range");
  }
  return Payload(owner_, {data_ + offset, size});
}

Payload Payload::copy_of(std::span<const std::byte> bytes) {
  if (bytes.empty()) return Payload();
  // One allocation holding the count and the bytes: a vector inside a shared_ptr takes two,
  // which shows on the small-message receive path.
  auto storage = std::make_shared_for_overwrite<std::byte[]>(bytes.size());
  std::memcpy(storage.get(), bytes.data(), bytes.size());
  const std::span<const std::byte> view(storage.get(), bytes.size());
  return Payload(std::shared_ptr<const void>(std::move(storage)), view);
}

Payload Payload::from_string(std::string_view text) {
  return copy_of(std::as_bytes(std::span(text.data(), text.size())));
}

Message Message::make(Kind kind, Topic topic, Payload payload) {
  Message message;
  message.header.kind = kind;
  message.header.priority = default_priority(kind);
  message.header.topic = topic;
  message.payload = std::move(payload);
  return message;
}

std::array<std::byte, kHeaderSize> encode_header(const Header& header,
                                                 std::span<const std::byte> payload) {
  std::array<std::byte, kHeaderSize> out{};
  std::byte* p = out.data();
  store_le<std::uint32_t>(p + kOffMagic, kMessageMagic);
  store_le<std::uint16_t>(p + kOffVersion, kMessageVersion);
  store_le<std::uint8_t>(p + kOffKind, static_cast<std::uint8_t>(header.kind));
  store_le<std::uint8_t>(p + kOffPriority, static_cast<std::uint8_t>(header.priority));
  store_le<std::uint32_t>(p + kOffFlags, header.flags);
  store_le<std::uint32_t>(p + kOffTopic, header.topic);
  store_le<std::int32_t>(p + kOffSource, header.source);
  store_le<std::int32_t>(p + kOffDestination, header.destination);
  store_le<std::uint64_t>(p + kOffSequence, header.sequence);
  store_le<std::uint64_t>(p + kOffCorrelation, header.correlation);
  store_le<std::uint64_t>(p + kOffTimestamp, header.timestamp_ns);
  store_le<std::uint64_t>(p + kOffPayloadLength, payload.size());
  store_le<std::uint64_t>(p + kOffChecksum, compute_checksum(p, payload));
  return out;
}

std::vector<std::byte> encode(const Message& message) {
  const auto header = encode_header(message.header, message.payload.bytes());
  std::vector<std::byte> out(kHeaderSize + message.payload.size());
  std::memcpy(out.data(), header.data(), kHeaderSize);
  if (!message.payload.empty()) {
    std::memcpy(out.data() + kHeaderSize, message.payload.data(), message.payload.size());
  }
  return out;
}

Header decode_header(std::span<const std::byte> bytes, const DecodeLimits& limits) {
  if (bytes.size() < kHeaderSize) {
    throw DecodeError(DecodeErrorCode::kTruncatedHeader, "got " + std::to_string(bytes.size()) +
                                                             " bytes, a header needs " +
                                                             std::to_string(kHeaderSize));
  }
  const std::byte* p = bytes.data();
  const auto magic = load_le<std::uint32_t>(p + kOffMagic);
  if (magic != kMessageMagic) {
    throw DecodeError(
        DecodeErrorCode::kBadMagic,
        "magic is " + hex(magic) + ", expected " + hex(kMessageMagic) + " (not a unimsg message)");
  }
  const auto version = load_le<std::uint16_t>(p + kOffVersion);
  if (version != kMessageVersion) {
    throw DecodeError(DecodeErrorCode::kUnsupportedVersion,
                      "format version " + std::to_string(version) + ", this build reads version " +
                          std::to_string(kMessageVersion));
  }
  const auto kind = load_le<std::uint8_t>(p + kOffKind);
  if (!is_known_kind(kind)) {
    throw DecodeError(DecodeErrorCode::kUnknownKind,
                      "kind " + std::to_string(kind) + " is not one of 1..10");
  }
  const auto priority = load_le<std::uint8_t>(p + kOffPriority);
  if (priority >= kPriorityLevels) {
    throw DecodeError(DecodeErrorCode::kBadPriority,
                      "priority " + std::to_string(priority) + " is not one of 0..3");
  }
  const auto message_flags = load_le<std::uint32_t>(p + kOffFlags);
  if ((message_flags & ~flags::kKnown) != 0) {
    throw DecodeError(DecodeErrorCode::kUnknownFlags,
                      "flags " + hex(message_flags) + " has bits outside " + hex(flags::kKnown));
  }
  const auto payload_length = load_le<std::uint64_t>(p + kOffPayloadLength);
  if (payload_length > limits.max_payload_bytes) {
    throw DecodeError(DecodeErrorCode::kPayloadTooLarge,
                      "payload length " + std::to_string(payload_length) +
                          " exceeds the configured maximum of " +
                          std::to_string(limits.max_payload_bytes) + " bytes");
  }

  Header header;
  header.kind = static_cast<Kind>(kind);
  header.priority = static_cast<Priority>(priority);
  header.flags = message_flags;
  header.topic = load_le<std::uint32_t>(p + kOffTopic);
  header.source = load_le<std::int32_t>(p + kOffSource);
  header.destination = load_le<std::int32_t>(p + kOffDestination);
  header.sequence = load_le<std::uint64_t>(p + kOffSequence);
  header.correlation = load_le<std::uint64_t>(p + kOffCorrelation);
  header.timestamp_ns = load_le<std::uint64_t>(p + kOffTimestamp);
  header.payload_length = payload_length;
  header.checksum = load_le<std::uint64_t>(p + kOffChecksum);
  return header;
}

namespace {

void check_payload_length(const Header& header, std::span<const std::byte> payload) {
  if (payload.size() < header.payload_length) {
    throw DecodeError(DecodeErrorCode::kTruncatedPayload,
                      "header announces " + std::to_string(header.payload_length) +
                          " payload bytes, got " + std::to_string(payload.size()));
  }
  if (payload.size() > header.payload_length) {
    throw DecodeError(DecodeErrorCode::kTrailingBytes,
                      "header announces " + std::to_string(header.payload_length) +
                          " payload bytes, got " + std::to_string(payload.size()));
  }
}

void check_checksum(const Header& header, std::uint64_t computed) {
  if (computed != header.checksum) {
    throw DecodeError(DecodeErrorCode::kChecksumMismatch,
                      "checksum " + hex(header.checksum) + " does not match the computed " +
                          hex(computed) + " (message damaged in transit)");
  }
}

}  // namespace

void verify_payload(const Header& header, std::span<const std::byte> payload) {
  check_payload_length(header, payload);
  // Recompute over the header as it would be encoded: any damaged header field changes it.
  const auto expected = encode_header(header, payload);
  check_checksum(header, load_le<std::uint64_t>(expected.data() + kOffChecksum));
}

void verify_payload(std::span<const std::byte, kHeaderSize> wire_header, const Header& header,
                    std::span<const std::byte> payload) {
  check_payload_length(header, payload);
  check_checksum(header, compute_checksum(wire_header.data(), payload));
}

namespace {

Message decode_impl(std::span<const std::byte> wire, const DecodeLimits& limits,
                    const Payload* shared_wire) {
  Message message;
  message.header = decode_header(wire, limits);
  const auto payload_bytes = wire.subspan(kHeaderSize);
  verify_payload(wire.first<kHeaderSize>(), message.header, payload_bytes);
  message.payload = shared_wire != nullptr ? shared_wire->slice(kHeaderSize, payload_bytes.size())
                                           : Payload::copy_of(payload_bytes);
  if (message.header.is_compressed()) return decompress(message, limits);
  return message;
}

}  // namespace

Message decode(std::span<const std::byte> wire, const DecodeLimits& limits) {
  return decode_impl(wire, limits, nullptr);
}

Message decode(const Payload& wire, const DecodeLimits& limits) {
  return decode_impl(wire.bytes(), limits, &wire);
}

Message compress(const Message& message, int level) {
  if (message.header.is_compressed() || message.payload.empty()) return message;
  const auto input = message.payload.bytes();
  std::vector<std::byte> out(ZSTD_compressBound(input.size()));
  const std::size_t written =
      ZSTD_compress(out.data(), out.size(), input.data(), input.size(), level);
  if (ZSTD_isError(written) || written >= input.size()) return message;
  out.resize(written);
  Message compressed;
  compressed.header = message.header;
  compressed.header.flags |= flags::kCompressed;
  compressed.payload = Payload(std::move(out));
  return compressed;
}

Message decompress(const Message& message, const DecodeLimits& limits) {
  if (!message.header.is_compressed()) return message;
  const auto input = message.payload.bytes();
  const unsigned long long content_size = ZSTD_getFrameContentSize(input.data(), input.size());
  if (content_size == ZSTD_CONTENTSIZE_ERROR || content_size == ZSTD_CONTENTSIZE_UNKNOWN) {
    throw DecodeError(DecodeErrorCode::kBadCompressedPayload,
                      "compressed payload is not a zstd frame with a known content size");
  }
  if (content_size > limits.max_payload_bytes) {
    throw DecodeError(DecodeErrorCode::kPayloadTooLarge,
                      "decompressed size " + std::to_string(content_size) +
                          " exceeds the configured maximum of " +
                          std::to_string(limits.max_payload_bytes) + " bytes");
  }
  std::vector<std::byte> out(static_cast<std::size_t>(content_size));
  const std::size_t written = ZSTD_decompress(out.data(), out.size(), input.data(), input.size());
  if (ZSTD_isError(written) || written != out.size()) {
    throw DecodeError(DecodeErrorCode::kBadCompressedPayload,
                      std::string("zstd could not decompress the payload: ") +
                          (ZSTD_isError(written) ? ZSTD_getErrorName(written) : "size differs"));
  }
  Message plain;
  plain.header = message.header;
  plain.header.flags &= ~flags::kCompressed;
  plain.header.payload_length = out.size();
  plain.payload = Payload(std::move(out));
  return plain;
}

}  // namespace unimsg
