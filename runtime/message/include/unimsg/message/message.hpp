#pragma once

// The Message envelope: one fixed 64-byte little-endian header for every message on the bus,
// then the payload. Encoding and decoding are pure functions; decode validates everything and
// throws a DecodeError whose code names the first check that failed.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace unimsg {

inline constexpr std::uint32_t kMessageMagic = 0x47534D55;  // "UMSG" in little-endian bytes
inline constexpr std::uint16_t kMessageVersion = 1;
inline constexpr std::size_t kHeaderSize = 64;
inline constexpr std::int32_t kBroadcast = -1;

enum class Kind : std::uint8_t {
  kControl = 1,
  kNegotiation = 2,
  kHeartbeat = 3,
  kStatus = 4,
  kFault = 5,
  kCheckpoint = 6,
  kData = 7,
  kTask = 8,
  kTaskResult = 9,
  kUser = 10,
};
inline constexpr std::array<Kind, 10> kAllKinds = {
    Kind::kControl,    Kind::kNegotiation, Kind::kHeartbeat, Kind::kStatus,     Kind::kFault,
    Kind::kCheckpoint, Kind::kData,        Kind::kTask,      Kind::kTaskResult, Kind::kUser};
const char* to_string(Kind kind) noexcept;

// Higher values leave first: faults and heartbeats overtake bulk data in a rank's send queue.
enum class Priority : std::uint8_t { kLow = 0, kNormal = 1, kHigh = 2, kCritical = 3 };
inline constexpr int kPriorityLevels = 4;
Priority default_priority(Kind kind) noexcept;
const char* to_string(Priority priority) noexcept;

namespace flags {
inline constexpr std::uint32_t kCompressed = 1u << 0;  // payload is one zstd frame
inline constexpr std::uint32_t kReply = 1u << 1;       // answers the request `correlation`
inline constexpr std::uint32_t kErrorReply = 1u << 2;  // the reply payload is an error text
inline constexpr std::uint32_t kKnown = kCompressed | kReply | kErrorReply;
}  // namespace flags

using Topic = std::uint32_t;
// Topics from here up are the bus's own (shutdown handshake and the like).
inline constexpr Topic kReservedTopicBase = 0xFFFF0000u;
// Topics from here to kReservedTopicBase belong to the runtime's services (collectives' progress
// queries, the engine's negotiation), each drawing its own at random.
inline constexpr Topic kServiceTopicBase = 0xC0000000u;

// Header fields in wire order. `payload_length` and `checksum` are computed by encode.
struct Header {
  Kind kind = Kind::kUser;
  Priority priority = Priority::kNormal;
  std::uint32_t flags = 0;
  Topic topic = 0;
  std::int32_t source = 0;
  std::int32_t destination = kBroadcast;
  std::uint64_t sequence = 0;
  std::uint64_t correlation = 0;
  std::uint64_t timestamp_ns = 0;
  std::uint64_t payload_length = 0;
  std::uint64_t checksum = 0;

  bool is_reply() const noexcept { return (flags & flags::kReply) != 0; }
  bool is_compressed() const noexcept { return (flags & flags::kCompressed) != 0; }
};

// Immutable, shared payload bytes: copying a Message (for example to broadcast it) shares the
// bytes instead of duplicating them.
class Payload {
 public:
  Payload() = default;
  explicit Payload(std::vector<std::byte> bytes);
  // Shares `owner`'s lifetime and views `bytes` inside it (zero-copy receive paths).
  Payload(std::shared_ptr<const void> owner, std::span<const std::byte> bytes);

  static Payload copy_of(std::span<const std::byte> bytes);
  static Payload from_string(std::string_view text);

  // A view of [offset, offset + size) that shares this payload's storage.
  Payload slice(std::size_t offset, std::size_t size) const;

  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::string_view as_string() const noexcept {
    return {reinterpret_cast<const char*>(data_), size_};
  }

 private:
  std::shared_ptr<const void> owner_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

struct Message {
  Header header;
  Payload payload;

  // A message of `kind` with the kind's default priority.
  static Message make(Kind kind, Topic topic, Payload payload = {});
};

struct DecodeLimits {
  // Largest payload accepted, compressed on the wire or decompressed.
  std::uint64_t max_payload_bytes = 256ull << 20;
};

// The 64 header bytes for `header` carrying `payload` (length and checksum filled in here).
std::array<std::byte, kHeaderSize> encode_header(const Header& header,
                                                 std::span<const std::byte> payload);
// Header followed by payload, as one buffer.
std::vector<std::byte> encode(const Message& message);

// Validates and parses the first kHeaderSize bytes: magic, version, kind, priority, flags and
// the payload length against the limits. The checksum is checked by verify_payload.
Header decode_header(std::span<const std::byte> bytes, const DecodeLimits& limits);
// Checks `payload` against the header's length and checksum.
void verify_payload(const Header& header, std::span<const std::byte> payload);
// The same check over the header bytes as received: no re-encoding, for the receive path.
void verify_payload(std::span<const std::byte, kHeaderSize> wire_header, const Header& header,
                    std::span<const std::byte> payload);
// Full decode of one encoded message (exactly header + payload, nothing more). A compressed
// payload is decompressed; the returned header then no longer has the kCompressed flag.
Message decode(std::span<const std::byte> wire, const DecodeLimits& limits);
// As above, but the returned payload shares `wire`'s storage instead of copying it.
Message decode(const Payload& wire, const DecodeLimits& limits);

// zstd-compresses the payload when that makes it smaller; otherwise returns the message as is.
Message compress(const Message& message, int level = 1);
// Undoes compress(); checks the decompressed size against the limits.
Message decompress(const Message& message, const DecodeLimits& limits);

}  // namespace unimsg
