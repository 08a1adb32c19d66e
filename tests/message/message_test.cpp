#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>

#include "unimsg/core/error.hpp"
#include "unimsg/message/message.hpp"

namespace unimsg {
namespace {

std::vector<std::byte> bytes_of(std::string_view text) {
  const auto view = std::as_bytes(std::span(text.data(), text.size()));
  return {view.begin(), view.end()};
}

Message sample_message(std::size_t payload_size = 32) {
  std::vector<std::byte> payload(payload_size);
  for (std::size_t i = 0; i < payload_size; ++i) payload[i] = static_cast<std::byte>(i * 7 + 3);
  Message message = Message::make(Kind::kStatus, 42, Payload(std::move(payload)));
  message.header.source = 3;
  message.header.destination = 1;
  message.header.sequence = 0x0102030405060708ull;
  message.header.correlation = 99;
  message.header.timestamp_ns = 1234567890123ull;
  message.header.flags = flags::kReply;
  return message;
}

DecodeErrorCode decode_error_code(std::span<const std::byte> wire, DecodeLimits limits = {}) {
  try {
    decode(wire, limits);
  } catch (const DecodeError& error) {
    return error.code();
  }
  ADD_FAILURE() << "decode accepted the input";
  return DecodeErrorCode::kTruncatedHeader;
}

TEST(MessageEnvelope, RoundTripKeepsEveryField) {
  for (const Kind kind : kAllKinds) {
    for (const std::size_t size : {0u, 1u, 63u, 64u, 1000u, 1u << 20}) {
      Message message = sample_message(size);
      message.header.kind = kind;
      message.header.priority = default_priority(kind);
      const auto wire = encode(message);
      ASSERT_EQ(wire.size(), kHeaderSize + size);
      const Message decoded = decode(std::span<const std::byte>(wire), DecodeLimits{});
      EXPECT_EQ(decoded.header.kind, kind);
      EXPECT_EQ(decoded.header.priority, default_priority(kind));
      EXPECT_EQ(decoded.header.flags, flags::kReply);
      EXPECT_EQ(decoded.header.topic, 42u);
      EXPECT_EQ(decoded.header.source, 3);
      EXPECT_EQ(decoded.header.destination, 1);
      EXPECT_EQ(decoded.header.sequence, 0x0102030405060708ull);
      EXPECT_EQ(decoded.header.correlation, 99u);
      EXPECT_EQ(decoded.header.timestamp_ns, 1234567890123ull);
      EXPECT_EQ(decoded.header.payload_length, size);
      ASSERT_EQ(decoded.payload.size(), size);
      EXPECT_TRUE(std::equal(decoded.payload.bytes().begin(), decoded.payload.bytes().end(),
                             message.payload.bytes().begin()));
    }
  }
}

TEST(MessageEnvelope, HeaderLayoutIsLittleEndianAtFixedOffsets) {
  Message message = sample_message(5);
  message.header.destination = kBroadcast;
  const auto wire = encode(message);
  const auto u8 = [&](std::size_t i) { return static_cast<unsigned>(wire[i]); };
  EXPECT_EQ(u8(0), 'U');
  EXPECT_EQ(u8(1), 'M');
  EXPECT_EQ(u8(2), 'S');
  EXPECT_EQ(u8(3), 'G');
  EXPECT_EQ(u8(4), 1u);  // version, low byte first
  EXPECT_EQ(u8(5), 0u);
  EXPECT_EQ(u8(6), static_cast<unsigned>(Kind::kStatus));
  EXPECT_EQ(u8(7), static_cast<unsigned>(Priority::kNormal));
  EXPECT_EQ(u8(8), flags::kReply);
  EXPECT_EQ(u8(12), 42u);                                         // topic
  EXPECT_EQ(u8(16), 3u);                                          // source
  for (std::size_t i = 20; i < 24; ++i) EXPECT_EQ(u8(i), 0xFFu);  // broadcast = -1
  EXPECT_EQ(u8(24), 0x08u);  // sequence 0x0102030405060708, least significant byte first
  EXPECT_EQ(u8(31), 0x01u);
  EXPECT_EQ(u8(48), 5u);  // payload length
}

TEST(MessageEnvelope, DecodeIsZeroCopyFromSharedWire) {
  const auto wire = Payload(encode(sample_message(100)));
  const Message decoded = decode(wire, DecodeLimits{});
  EXPECT_EQ(decoded.payload.data(), wire.data() + kHeaderSize);
}

TEST(MessageDecodeErrors, TruncatedHeader) {
  const auto wire = encode(sample_message());
  for (std::size_t n : {0u, 1u, 63u}) {
    EXPECT_EQ(decode_error_code(std::span(wire).first(n)), DecodeErrorCode::kTruncatedHeader);
  }
}

TEST(MessageDecodeErrors, TruncatedPayload) {
  const auto wire = encode(sample_message(32));
  EXPECT_EQ(decode_error_code(std::span(wire).first(wire.size() - 1)),
            DecodeErrorCode::kTruncatedPayload);
  EXPECT_EQ(decode_error_code(std::span(wire).first(kHeaderSize)),
            DecodeErrorCode::kTruncatedPayload);
}

TEST(MessageDecodeErrors, TrailingBytes) {
  auto wire = encode(sample_message(32));
  wire.push_back(std::byte{0});
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kTrailingBytes);
}

TEST(MessageDecodeErrors, WrongMagic) {
  auto wire = encode(sample_message());
  wire[0] = std::byte{'X'};
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kBadMagic);
  EXPECT_EQ(decode_error_code(bytes_of(std::string(100, 'a'))), DecodeErrorCode::kBadMagic);
}

TEST(MessageDecodeErrors, UnsupportedVersion) {
  auto wire = encode(sample_message());
  wire[4] = std::byte{2};
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kUnsupportedVersion);
}

TEST(MessageDecodeErrors, UnknownKind) {
  for (const int kind : {0, 11, 255}) {
    auto wire = encode(sample_message());
    wire[6] = static_cast<std::byte>(kind);
    EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kUnknownKind) << kind;
  }
}

TEST(MessageDecodeErrors, InvalidPriorityAndUnknownFlags) {
  auto wire = encode(sample_message());
  wire[7] = std::byte{4};
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kBadPriority);
  wire = encode(sample_message());
  wire[11] = std::byte{0x80};
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kUnknownFlags);
}

TEST(MessageDecodeErrors, LengthOverConfiguredMaximum) {
  const auto wire = encode(sample_message(2000));
  EXPECT_EQ(decode_error_code(wire, DecodeLimits{1999}), DecodeErrorCode::kPayloadTooLarge);
  EXPECT_NO_THROW(decode(std::span<const std::byte>(wire), DecodeLimits{2000}));
  // A huge announced length is refused before anything is read past the header.
  auto lying = encode(sample_message(0));
  lying[48 + 7] = std::byte{0x7F};
  EXPECT_EQ(decode_error_code(lying), DecodeErrorCode::kPayloadTooLarge);
}

TEST(MessageDecodeErrors, ChecksumCoversPayloadAndHeader) {
  auto wire = encode(sample_message(32));
  wire[kHeaderSize + 5] ^= std::byte{0x01};
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kChecksumMismatch);
  wire = encode(sample_message(32));
  wire[12] ^= std::byte{0x01};  // topic
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kChecksumMismatch);
  wire = encode(sample_message(32));
  wire[60] ^= std::byte{0x10};  // the checksum itself
  EXPECT_EQ(decode_error_code(wire), DecodeErrorCode::kChecksumMismatch);
}

TEST(MessageDecodeErrors, MessagesNameTheProblem) {
  auto wire = encode(sample_message(32));
  wire[kHeaderSize] ^= std::byte{0xFF};
  try {
    decode(std::span<const std::byte>(wire), DecodeLimits{});
    FAIL() << "accepted a damaged payload";
  } catch (const DecodeError& error) {
    EXPECT_NE(std::string(error.what()).find("checksum mismatch"), std::string::npos)
        << error.what();
    EXPECT_EQ(error.operation(), "message.decode (checksum mismatch)");
  }
  try {
    decode(std::span(wire).first(10), DecodeLimits{});
    FAIL() << "accepted 10 bytes";
  } catch (const DecodeError& error) {
    EXPECT_NE(std::string(error.what()).find("got 10 bytes, a header needs 64"), std::string::npos)
        << error.what();
  }
}

TEST(MessageCompression, RoundTripAndFlag) {
  std::string text;
  for (int i = 0; i < 10000; ++i) text += "gradient bucket " + std::to_string(i % 10) + "\n";
  const Message plain = Message::make(Kind::kData, 7, Payload::from_string(text));
  const Message packed = compress(plain);
  ASSERT_TRUE(packed.header.is_compressed());
  EXPECT_LT(packed.payload.size(), plain.payload.size() / 4);
  const auto wire = encode(packed);
  const Message decoded = decode(std::span<const std::byte>(wire), DecodeLimits{});
  EXPECT_FALSE(decoded.header.is_compressed());
  EXPECT_EQ(decoded.payload.as_string(), text);
}

TEST(MessageCompression, IncompressiblePayloadStaysPlain) {
  std::vector<std::byte> noise(4096);
  std::mt19937 rng(1);
  for (auto& b : noise) b = static_cast<std::byte>(rng());
  const Message message = Message::make(Kind::kData, 7, Payload(std::move(noise)));
  EXPECT_FALSE(compress(message).header.is_compressed());
}

TEST(MessageCompression, DecompressedSizeIsLimited) {
  const Message big = Message::make(Kind::kData, 7, Payload(std::vector<std::byte>(1 << 20)));
  const auto wire = encode(compress(big));
  ASSERT_LT(wire.size(), 64u * 1024u);
  EXPECT_EQ(decode_error_code(wire, DecodeLimits{64 * 1024}), DecodeErrorCode::kPayloadTooLarge);
}

TEST(MessageCompression, GarbageFrameIsRejected) {
  Message fake = Message::make(Kind::kData, 7, Payload::from_string("not a zstd frame at all"));
  fake.header.flags |= flags::kCompressed;
  EXPECT_EQ(decode_error_code(encode(fake)), DecodeErrorCode::kBadCompressedPayload);
}

// A deterministic mini-fuzz: random damage is always either decoded or a DecodeError.
TEST(MessageDecodeErrors, RandomDamageNeverCrashes) {
  std::mt19937_64 rng(12345);
  const auto original = encode(sample_message(200));
  int rejected = 0;
  for (int round = 0; round < 20000; ++round) {
    auto wire = original;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) wire[rng() % wire.size()] = static_cast<std::byte>(rng());
    if (rng() % 4 == 0) wire.resize(rng() % (wire.size() + 1));
    try {
      decode(std::span<const std::byte>(wire), DecodeLimits{});
    } catch (const DecodeError&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 19000);
}

}  // namespace
}  // namespace unimsg
