#include "taskvec/error.hpp"

namespace taskvec {

std::string_view error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid_argument";
    case ErrorCode::kExpression: return "expression";
    case ErrorCode::kRecipe: return "recipe";
    case ErrorCode::kIo: return "io";
    case ErrorCode::kOutputExists: return "output_exists";
    case ErrorCode::kDiskFull: return "disk_full";
    case ErrorCode::kHeaderTooSmall: return "header_too_small";
    case ErrorCode::kHeaderTooLarge: return "header_too_large";
    case ErrorCode::kInvalidHeaderLength: return "invalid_header_length";
    case ErrorCode::kInvalidUtf8: return "invalid_utf8";
    case ErrorCode::kInvalidJson: return "invalid_json";
    case ErrorCode::kDuplicateKey: return "duplicate_key";
    case ErrorCode::kInvalidMetadata: return "invalid_metadata";
    case ErrorCode::kInvalidTensorEntry: return "invalid_tensor_entry";
    case ErrorCode::kInvalidName: return "invalid_name";
    case ErrorCode::kUnknownDtype: return "unknown_dtype";
    case ErrorCode::kInvalidShape: return "invalid_shape";
    case ErrorCode::kShapeOverflow: return "shape_overflow";
    case ErrorCode::kInvalidOffsets: return "invalid_offsets";
    case ErrorCode::kTensorSizeMismatch: return "tensor_size_mismatch";
    case ErrorCode::kIncompleteBuffer: return "incomplete_buffer";
    case ErrorCode::kInvalidIndex: return "invalid_index";
    case ErrorCode::kShardMissing: return "shard_missing";
    case ErrorCode::kShardEscapes: return "shard_escapes";
    case ErrorCode::kInvalidArchive: return "invalid_archive";
    case ErrorCode::kInvalidPickle: return "invalid_pickle";
    case ErrorCode::kUnsafePickle: return "unsafe_pickle";
    case ErrorCode::kInvalidAdapter: return "invalid_adapter";
    case ErrorCode::kTensorMissing: return "tensor_missing";
    case ErrorCode::kShapeMismatch: return "shape_mismatch";
    case ErrorCode::kDtypeMismatch: return "dtype_mismatch";
    case ErrorCode::kBaseMismatch: return "base_mismatch";
    case ErrorCode::kArchitectureMismatch: return "architecture_mismatch";
    case ErrorCode::kNonFinite: return "non_finite";
    case ErrorCode::kTensorTooLarge: return "tensor_too_large";
    case ErrorCode::kQuantized: return "quantized";
    case ErrorCode::kOverflow: return "overflow";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kInternal: return "internal";
  }
  return "unknown";
}

int exit_status(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kExpression:
    case ErrorCode::kRecipe:
    case ErrorCode::kUnsupported:
      return 2;
    case ErrorCode::kIo:
      return 3;
    case ErrorCode::kHeaderTooSmall:
    case ErrorCode::kHeaderTooLarge:
    case ErrorCode::kInvalidHeaderLength:
    case ErrorCode::kInvalidUtf8:
    case ErrorCode::kInvalidJson:
    case ErrorCode::kDuplicateKey:
    case ErrorCode::kInvalidMetadata:
    case ErrorCode::kInvalidTensorEntry:
    case ErrorCode::kInvalidName:
    case ErrorCode::kUnknownDtype:
    case ErrorCode::kInvalidShape:
    case ErrorCode::kShapeOverflow:
    case ErrorCode::kInvalidOffsets:
    case ErrorCode::kTensorSizeMismatch:
    case ErrorCode::kIncompleteBuffer:
    case ErrorCode::kInvalidIndex:
    case ErrorCode::kShardMissing:
    case ErrorCode::kShardEscapes:
    case ErrorCode::kInvalidArchive:
    case ErrorCode::kInvalidPickle:
    case ErrorCode::kUnsafePickle:
    case ErrorCode::kInvalidAdapter:
      return 4;
    case ErrorCode::kTensorMissing:
    case ErrorCode::kShapeMismatch:
    case ErrorCode::kDtypeMismatch:
    case ErrorCode::kBaseMismatch:
    case ErrorCode::kArchitectureMismatch:
    case ErrorCode::kNonFinite:
    case ErrorCode::kTensorTooLarge:
    case ErrorCode::kQuantized:
    case ErrorCode::kOverflow:
      return 5;
    case ErrorCode::kOutputExists:
      return 6;
    case ErrorCode::kDiskFull:
      return 7;
    case ErrorCode::kInternal:
      return 70;
  }
  return 70;
}

}  // namespace taskvec
