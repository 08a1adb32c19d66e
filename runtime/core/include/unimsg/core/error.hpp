#pragma once

#include <stdexcept>
#include <string>

namespace unimsg {

// Rank value used where an error is raised outside any rank context (a pure decoder, a CLI).
inline constexpr int kNoRank = -1;

// Base of every error unimsg throws. It carries which rank saw it, which operation failed and
// why, and formats them into one message: "[rank 2] bus.request: timed out after 5 s ...".
class Error : public std::runtime_error {
 public:
  Error(int rank, std::string operation, std::string cause);

  int rank() const noexcept { return rank_; }
  const std::string& operation() const noexcept { return operation_; }
  const std::string& cause() const noexcept { return cause_; }

 private:
  int rank_;
  std::string operation_;
  std::string cause_;
};

// A Message (or other wire input) could not be decoded. `code()` tells which check failed.
enum class DecodeErrorCode {
  kTruncatedHeader,
  kTruncatedPayload,
  kTrailingBytes,
  kBadMagic,
  kUnsupportedVersion,
  kUnknownKind,
  kBadPriority,
  kUnknownFlags,
  kPayloadTooLarge,
  kChecksumMismatch,
  kBadCompressedPayload,
  kBadPayload,  // the payload's content is malformed for its kind (a status report, ...)
};
const char* to_string(DecodeErrorCode code) noexcept;

class DecodeError : public Error {
 public:
  DecodeError(DecodeErrorCode code, std::string cause, int rank = kNoRank);
  DecodeErrorCode code() const noexcept { return code_; }

 private:
  DecodeErrorCode code_;
};

// An operation did not finish within its deadline.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// Ranks disagree (dtype, shape, op, protocol).
class MismatchError : public Error {
 public:
  using Error::Error;
};

// A peer rank is gone or stopped answering.
class PeerLostError : public Error {
 public:
  using Error::Error;
};

// A checkpoint could not be written or read.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

// A data file (a dataset's IDX file, a sample stream) is missing or malformed.
class DataError : public Error {
 public:
  using Error::Error;
};

// A setting (flag, environment variable, option) is invalid.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// An MPI call failed; the cause holds MPI's own error string.
class MpiError : public Error {
 public:
  using Error::Error;
};

// The object was used after it was shut down (or while shutting down).
class ShutdownError : public Error {
 public:
  using Error::Error;
};

}  // namespace unimsg
