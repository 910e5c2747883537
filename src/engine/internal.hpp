// Internal helpers shared by the engine's two drivers (linear_edit.cpp, merge_driver.cpp).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"
#include "taskvec/merge.hpp"

namespace taskvec::detail {

/// Bytes read per pread when a tensor range is decoded piecewise (read_decoded): 256 KiB, so that the
/// staged bytes stay in the L2 cache while they are decoded.
inline constexpr std::uint64_t kReadPieceBytes = std::uint64_t{1} << 18;

/// Reads elements [begin, begin + count) of `t` (any editable float dtype) and decodes them into
/// dst[0..count) as f32 / f64 (exact widening, docs/NUMERICS.md), reading at most kReadPieceBytes at a
/// time into `staging` (grown as needed, reusable across calls). Throws as CheckpointTensor::read.
void read_decoded(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count, float* dst,
                  std::vector<std::byte>& staging);
void read_decoded(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count, double* dst,
                  std::vector<std::byte>& staging);

/// Copies bytes [byte_begin, byte_begin + byte_count) of `t` unchanged to the same offsets of output
/// tensor (shard, index) of `writer`, kReadPieceBytes at a time through `staging`. Throws as
/// CheckpointTensor::read and CheckpointWriter::write.
void copy_tensor_bytes(const CheckpointTensor& t, std::uint64_t byte_begin, std::uint64_t byte_count,
                       const CheckpointWriter& writer, std::size_t shard, std::size_t index, std::vector<std::byte>& staging);

/// True when `a` and `b` hold the same number of bytes and the same bytes (read with pread, 256 KiB
/// pieces). Throws as CheckpointTensor::read.
bool same_bytes(const CheckpointTensor& a, const CheckpointTensor& b);

/// "[2, 3]" for messages.
std::string shape_text(const std::vector<std::uint64_t>& shape);

/// --include / --exclude (EditOptions): a tensor is selected when its name matches `include` (if
/// given) and does not match `exclude` (if given); ECMAScript, std::regex_search. The constructor
/// throws Error{kInvalidArgument} naming the flag for an invalid pattern.
class TensorFilter {
 public:
  TensorFilter(const std::string& include, const std::string& exclude);
  bool selects(const std::string& name) const;

 private:
  std::optional<std::regex> include_, exclude_;
};

/// The input embeddings a tied head can be read from, in the order they are looked for.
inline constexpr std::array<const char*, 5> kEmbeddingNames{
    "model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight", "embed_tokens.weight"};

/// What a folder output gets besides its tensors: the auxiliary files to copy (config.json,
/// tokenizer, ...) and files taskvec writes itself (file name -> content), which replace a copy of the
/// same name; both go through CheckpointWriter::commit. `warnings` go into EditReport::warnings.
struct OutputAuxiliary {
  std::vector<std::filesystem::path> copies;
  std::map<std::string, std::string> generated;
  std::vector<std::string> warnings;
  /// The file names the output folder receives from `copies` and `generated`, sorted, each once.
  std::vector<std::string> file_names() const {
    std::set<std::string> names;
    for (const auto& c : copies) names.insert(c.filename().string());
    for (const auto& [name, content] : generated) names.insert(name);
    return {names.begin(), names.end()};
  }
};

/// The vocabulary of an output whose embedding has more rows than the base's (--merge-extra-rows):
/// `rows` = the output's embedding rows (0: not resized), `donor` = the first input that has the extra
/// rows (its tokenizer files go to the output).
struct OutputVocab {
  std::uint64_t rows = 0;
  const Checkpoint* donor = nullptr;
};

/// The base's auxiliary files. When the base's tied head was untied (reconcile_tied_embeddings),
/// config.json is generated with every "tie_word_embeddings" (top level and nested sub-configs) false.
/// When `vocab.rows` > 0, the tokenizer files (tokenizer*, special_tokens_map.json, added_tokens.json,
/// vocab*, merges.txt, *.model) come from `vocab.donor`'s folder instead of the base's, config.json gets
/// vocab_size = vocab.rows (top level and text sub-configs that have one), and a warning names every
/// tokenizer file naming an id >= vocab.rows (or that cannot be parsed). Throws Error{kIo} for a
/// config.json that must be rewritten and cannot be read or parsed.
OutputAuxiliary output_auxiliary_files(const Checkpoint& base, bool untied_base, const OutputVocab& vocab = {});

/// Whether the folder's config.json ties the head to the input embedding, read at every level (a
/// multimodal config's text_config.tie_word_embeddings counts): true if any flag is true, false if
/// all flags are false, nullopt without a folder, a config.json, a flag, or for an unparseable config.
std::optional<bool> config_ties_embeddings(const Checkpoint& ckpt);

/// The text of `config` rewritten: every tie_word_embeddings false (and a top-level one added) when
/// `untie`; vocab_size (top level, and text_config / language_config / llm_config / decoder /
/// text_model when they have one) = *vocab_rows when given. Throws Error{kIo} for a file that cannot
/// be read or parsed, or is not a JSON object.
std::string rewrite_config(const std::filesystem::path& config, bool untie, std::optional<std::uint64_t> vocab_rows);

/// A tokenizer file of a model folder: tokenizer*, special_tokens_map.json, added_tokens.json, vocab*,
/// merges.txt, *.model.
bool is_tokenizer_file(const std::filesystem::path& path);

/// `config_text` (a config.json) with "torch_dtype" (and "dtype", which newer transformers write, where
/// present) set to `torch_dtype` (e.g. "bfloat16"), and "num_hidden_layers" (top level, and in a text
/// sub-config that has one) set to `num_hidden_layers`, "vocab_size" (the same places) to `vocab_size`;
/// nullopt when nothing changes or the text is not a JSON object (it is then copied as it is).
std::optional<std::string> config_with_updates(const std::string& config_text, const std::optional<std::string>& torch_dtype,
                                               std::optional<std::uint64_t> num_hidden_layers,
                                               std::optional<std::uint64_t> vocab_size = std::nullopt);

/// The file of `files` named `name` read whole (at most 256 MiB); nullopt when none is.
std::optional<std::string> read_auxiliary(const std::vector<std::filesystem::path>& files, const std::string& name);

/// An embedding tensor and its first dimension (rows = vocabulary entries).
struct EmbeddingRows {
  std::string tensor;
  std::uint64_t rows = 0;
};

/// The rows of the checkpoint's input embedding (kEmbeddingNames, then lm_head.weight); nullopt if it
/// has none of them.
std::optional<EmbeddingRows> embedding_rows(const Checkpoint& ckpt);

/// The largest token id one tokenizer file names.
struct TokenizerId {
  std::filesystem::path file;
  std::uint64_t max_id = 0;
};

/// The largest id named by each of the folder's tokenizer.json (model.vocab: a token -> id object, or
/// a Unigram [piece, score] list whose ids are its indices; added_tokens[].id), added_tokens.json
/// (values) and tokenizer_config.json (added_tokens_decoder keys); files absent or naming no id are
/// left out. Throws Error{kIo} for a file that cannot be read or parsed.
std::vector<TokenizerId> tokenizer_ids(const std::filesystem::path& folder);

/// Checks the inputs of an edit or merge against each other (checkpoints without a folder or a
/// config.json are skipped) and appends one warning per finding: each key of model_type, architectures,
/// hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size and
/// vocab_size (not with `merge_extra_rows`, which explains it) whose value differs from the first
/// input's config.json (top level and text sub-configs), naming both values and files; and each
/// tokenizer file of an input naming an id >= that input's embedding rows. A config.json or tokenizer
/// file that cannot be read or parsed is a warning too (it is copied as it is); throws nothing of its own.
/// One architecture key on which two inputs' config.json disagree.
struct ConfigDifference {
  std::string key;  ///< e.g. "hidden_size", "text_config.num_hidden_layers"
  std::string value_a, value_b;
  std::filesystem::path file_a, file_b;
};
/// With `differences`, the config.json findings go there instead of into `warnings` (merge refuses them
/// unless --allow-crimes).
/// `tokenizer_merge`: ids past an input's rows are its unused padding, which the merge leaves out, not a
/// finding (and vocab_size may differ, as with merge_extra_rows).
void check_input_configs(const std::vector<const Checkpoint*>& inputs, bool merge_extra_rows,
                         std::vector<std::string>& warnings, std::vector<ConfigDifference>* differences = nullptr,
                         bool tokenizer_merge = false);
void check_input_configs(const std::vector<Checkpoint>& inputs, bool merge_extra_rows,
                         std::vector<std::string>& warnings);

/// The vocabulary of a planned output: when its embedding (kEmbeddingNames, then lm_head.weight) has
/// more rows than inputs[0]'s (the base), rows = the output rows and donor = the first of inputs[1..]
/// with that many rows (it supplied the last extra row, so the output has all of its rows); else {}.
OutputVocab output_vocab(const CheckpointPlan& plan, const std::vector<Checkpoint>& inputs);

// ---- Input checks shared by linear_edit, merge_checkpoints and task_vector_similarity (input_check.cpp):
// one wording and one error code per problem, whichever command meets it.

/// The folder's config.json as text, or nullopt when the checkpoint has no folder or no config.json.
/// Read with a size cap (16 MiB; larger is Error{kIo} naming the file). Isolated so that a shared
/// checked small-file reader of src/format can replace it.
std::optional<std::string> read_config_text(const Checkpoint& ckpt);

/// Refuses quantized storage with Error{kQuantized}, before any output exists: block-scaled FP8
/// (an F8_* tensor X.weight with X.weight_scale_inv / X.weight_scale / X.scale_inv / X.input_scale),
/// bitsandbytes 4-bit (X.weight.absmax, .quant_map, .quant_state.*, .nested_absmax) and 8-bit (X.SCB,
/// X.weight_format), GPTQ / AWQ (X.qweight, X.qzeros, X.scales, X.g_idx), and any config.json
/// `quantization_config` (its quant_method named). The message names the file, the method and one
/// example tensor, and asks for the full-precision (or dequantized) checkpoints. A plain F8 checkpoint
/// (no scales, no quantization_config) passes.
void check_not_quantized(const Checkpoint& ckpt);

/// The value of __metadata__ taskvec.kind ("task_vector" for files written by diff), or "" when absent.
std::string checkpoint_kind(const Checkpoint& ckpt);

/// Throws Error{kInvalidArgument} when `ckpt` is a PEFT adapter, which has only deltas, used where a
/// model is needed (`role`, e.g. "the pretrained checkpoint of apply"); the message says how to use it.
void require_model(const Checkpoint& ckpt, const std::string& role);

/// `ckpt` as a model over `base`: an adapter becomes base + its delta (stored in `holder`); anything
/// else is returned as is.
const Checkpoint& as_model(const Checkpoint& ckpt, const Checkpoint& base, std::optional<Checkpoint>& holder);

/// For a PEFT adapter applied to `base`: a note naming the base model the adapter records
/// (base_model_name_or_path) when it is not the folder name of `base`, so a user can see a mismatch;
/// nullopt otherwise. Shapes are checked by Checkpoint::adapter_over.
std::optional<std::string> adapter_base_note(const Checkpoint& adapter, const Checkpoint& base);

/// A warning when `ckpt` is labeled a task vector (taskvec.kind=task_vector) but is used as a model,
/// `role` saying how ("the pretrained checkpoint", "a model of the recipe"); nullopt otherwise.
std::optional<std::string> task_vector_as_model_warning(const Checkpoint& ckpt, const std::string& role);

/// ||x|| / ||ref|| over a fixed sample of the float tensors both have with the same shape (up to 4
/// pieces of 4096 elements per tensor, at most 256 tensors, the same elements in both): ~0 for a task
/// vector of a fine-tune of `ref`, ~1 for a full model. nullopt when nothing could be sampled or the
/// sampled ref is all zero. Throws as CheckpointTensor::read.
std::optional<double> sampled_norm_ratio(const Checkpoint& x, const Checkpoint& ref);

/// Above this sampled_norm_ratio an unlabeled `apply -t` input is taken for a full model.
inline constexpr double kFullModelNormRatio = 0.5;

/// How an input's tensor compares with the reference's (the pretrained / base checkpoint).
enum class TensorFit { kSame, kExtraRows };

/// Checks tensor `name` of `input` (`t`, null when missing) against the reference's `r`:
/// Error{kTensorMissing} when missing, Error{kShapeMismatch} naming both shapes (kExtraRows instead
/// when only the first dimension differs, the dtype is float and `merge_extra_rows`; the hint names
/// --merge-extra-rows only when `extra_rows_flag`, i.e. the command has it), Error{kDtypeMismatch}
/// when a float tensor meets a non-float one.
TensorFit check_input_tensor(const std::string& name, const Checkpoint& ref, const CheckpointTensor& r,
                             const Checkpoint& input, const CheckpointTensor* t, bool extra_rows_flag,
                             bool merge_extra_rows);

/// For an integer/bool tensor (never combined, copied from `copied_from`): the warning when the
/// fine-tuned `t` differs from `r` (dtype or bytes), nullopt when equal. Throws as same_bytes.
std::optional<std::string> integer_tensor_change(const std::string& name, const CheckpointTensor& r,
                                                 const CheckpointTensor& t, const std::string& copied_from);

/// Error{kTensorMissing} for tensor `name` of `input` that the reference lacks; `hint` (may be empty)
/// is appended, e.g. the flags that keep or drop such tensors on the command at hand.
[[noreturn]] void throw_extra_tensor(const std::string& name, const Checkpoint& input, const Checkpoint& ref,
                                     const std::string& hint);

// ---- Tokenizer merge (vocab_merge.cpp) ----

/// What a tokenizer merge gives the output folder: its embedding rows (config.json vocab_size), the
/// tokenizer files to copy (from the tokenizer source's folder) and the ones rewritten (file name ->
/// content: tokenizer.json, tokenizer_config.json, added_tokens.json with the new tokens and without the
/// stripped ones), and warnings.
struct VocabMerge {
  std::uint64_t rows = 0;
  std::vector<std::filesystem::path> copies;
  std::map<std::string, std::string> generated;
  std::vector<std::string> warnings;
};

/// mergekit's tokenizer merge for `recipe.tokenizer` (which must be set) over `inputs` (the base first
/// when `base_index` is set, then the models; `refs` and `labels` parallel to them): builds the output
/// vocabulary and replaces every input's embedding and lm_head (kEmbeddingNames, kHeadName; 2-D) by a view
/// with one row per output token (Checkpoint::replace_tensor), so that row r means the same token in every
/// input. Reads only the default rows (and, with pad_to_multiple_of, every row once for the mean).
/// Throws Error{kRecipe} for a `tokens:` source that is not a recipe model or lacks its token, a source
/// without tokenizer.json; Error{kShapeMismatch} for a token id past its input's embedding rows or rows
/// of different widths; Error{kDtypeMismatch} for a non-float embedding; Error{kIo} for an unparsable file.
VocabMerge merge_vocabularies(const Recipe& recipe, const std::vector<Checkpoint*>& inputs,
                              const std::vector<RecipeModelRef>& refs, const std::vector<std::string>& labels,
                              std::optional<std::size_t> base_index);

/// The chat template text `recipe.chat_template` names: "auto" = the most common template of `inputs`
/// (tokenizer_config.json chat_template, its "default" entry when a list, or chat_template.jinja; ties:
/// the first input's; nullopt when none has one), a built-in name (alpaca, chatml, exaone, llama3,
/// mistral: taskvec's own texts of those formats), else the text itself.
std::optional<std::string> chat_template_text(const std::string& chat_template, const std::vector<const Checkpoint*>& inputs);
/// The built-in template names chat_template_text knows, sorted (what `chat_template:` accepts besides auto).
std::vector<std::string> builtin_chat_template_names();

/// The folder's config.json vocab_size (top level, else the first text sub-config that has one);
/// nullopt without a readable config.json or the key.
std::optional<std::int64_t> config_vocab_size(const Checkpoint& ckpt);

/// Whether `ref` names the same model as PATH (+ADAPTER) (symlinks resolved where the paths exist).
bool same_recipe_model(const RecipeModelRef& ref, const std::filesystem::path& path,
                       const std::optional<std::filesystem::path>& adapter);

}  // namespace taskvec::detail
