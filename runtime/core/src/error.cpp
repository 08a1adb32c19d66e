#include "unimsg/core/error.hpp"

#include <utility>

namespace unimsg {
namespace {

std::string format_error(int rank, const std::string& operation, const std::string& cause) {
  std::string text;
  if (rank != kNoRank) text += "[rank " + std::to_string(rank) + "] ";
  text += operation;
  text += ": ";
  text += cause;
  return text;
}

}  // namespace

Error::Error(int rank, std::string operation, std::string cause)
    : std::runtime_error(format_error(rank, operation, cause)),
      rank_(rank),
      operation_(std::move(operation)),
      cause_(std::move(cause)) {}

const char* to_string(DecodeErrorCode code) noexcept {
  switch (code) {
    case DecodeErrorCode::kTruncatedHeader:
      return "truncated header";
    case DecodeErrorCode::kTruncatedPayload:
      return "truncated payload";
    case DecodeErrorCode::kTrailingBytes:
      return "trailing bytes";
    case DecodeErrorCode::kBadMagic:
      return "wrong magic";
    case DecodeErrorCode::kUnsupportedVersion:
      return "unsupported version";
    case DecodeErrorCode::kUnknownKind:
      return "unknown kind";
    case DecodeErrorCode::kBadPriority:
      return "invalid priority";
    case DecodeErrorCode::kUnknownFlags:
      return "unknown flags";
    case DecodeErrorCode::kPayloadTooLarge:
      return "payload too large";
    case DecodeErrorCode::kChecksumMismatch:
      return "checksum mismatch";
    case DecodeErrorCode::kBadCompressedPayload:
      return "bad compressed payload";
    case DecodeErrorCode::kBadPayload:
      return "bad payload";
  }
  return "unknown decode error";
}

DecodeError::DecodeError(DecodeErrorCode code, std::string cause, int rank)
    : Error(rank, std::string("message.decode (") + to_string(code) + ")", std::move(cause)),
      code_(code) {}

}  // namespace unimsg
