/*
 * pipit's C ABI: plan, train, generate and evaluate, with options and results as JSON text.
 *
 * Generated from capi/src/lib.rs by cbindgen when the crate builds; do not edit.
 *
 * Conventions:
 * - Every call returns a PipitStatus; on anything but PIPIT_OK, pipit_last_error() gives
 *   pipit's one-line message for this thread.
 * - Options are a NUL-terminated UTF-8 JSON object (or TOML table) whose keys are the flags of
 *   the pipit subcommand of the same name with '_' for '-': {"stages": 4} is --stages 4.
 *   pipit only reads them during the call; they stay the caller's. The one option of the
 *   library's own, "verbose": true, keeps the command line's messages on stderr (the device,
 *   the stages, progress); by default a call prints nothing.
 * - A `char **result` receives a NUL-terminated UTF-8 JSON text that the caller owns and
 *   frees with pipit_string_free (it is set to NULL when the call fails).
 * - A PipitTrainer is freed with pipit_trainer_free; it may be used from one thread at a time.
 * - No panic or Rust error crosses this boundary: each becomes PIPIT_ERROR and a message.
 */

#ifndef PIPIT_H
#define PIPIT_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/* The version of pipit this header comes from. */
#define PIPIT_VERSION "0.1.0"

// What a call did.
typedef enum PipitStatus {
  // It did what was asked.
  PIPIT_OK = 0,
  // It failed for a reason outside the caller's input (a device, a file system, a bug).
  PIPIT_ERROR = 1,
  // The caller's input was wrong: a bad option, value or path (the command line's exit
  // status 2).
  PIPIT_INVALID_INPUT = 2,
  // The progress callback asked to stop.
  PIPIT_CANCELLED = 3,
} PipitStatus;

// A training run in this process (`pipit train`, a step at a time).
typedef struct PipitTrainer PipitTrainer;

// Called after each step by pipit_trainer_run with the step's JSON line (valid during the
// call only) and the caller's `user` pointer; returning nonzero stops the run there.
typedef int (*PipitProgress)(const char *record_json, void *user);

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The version of the library, e.g. "0.1.0" (static; never freed). Compare with
// PIPIT_VERSION to check that the header and the library agree.
const char *pipit_version(void);

// This thread's last error message (one line, UTF-8), or "" if none yet. Owned by pipit:
// valid until this thread's next call into pipit; never freed by the caller.
const char *pipit_last_error(void);

// Free a string pipit returned through a `char **result` (NULL is ignored).
//
// # Safety
// `text` is NULL or a string pipit returned and not yet freed.
void pipit_string_free(char *text);

// Plan a pipeline step, as `pipit plan --format json`: `options` are its flags
// ({"schedule": "1f1b", "stages": 4, "microbatches": 8}); `*result` gets its JSON.
//
// # Safety
// `options` is NULL or a NUL-terminated string; `result` is writable.
enum PipitStatus pipit_plan(const char *options, char **result);

// Generate from a checkpoint, as `pipit generate --format json` ({"checkpoint": "runs/latest",
// "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}); `*result` gets its JSON.
//
// # Safety
// As pipit_plan.
enum PipitStatus pipit_generate(const char *options, char **result);

// Score a checkpoint on a text, as `pipit eval --format json` ({"checkpoint": "runs/latest"});
// `*result` gets {"loss", "tokens", "per"}.
//
// # Safety
// As pipit_plan.
enum PipitStatus pipit_evaluate(const char *options, char **result);

// Build a training run from `pipit train`'s flags (JSON, or TOML as in `--config`:
// "n_embd = 32\nsteps = 20"); `*trainer` gets it, to free with pipit_trainer_free. Nothing
// is trained or saved yet.
//
// # Safety
// `options` is NULL or a NUL-terminated string; `trainer` is writable.
enum PipitStatus pipit_trainer_new(const char *options, struct PipitTrainer **trainer);

// Train one step (and evaluate where `pipit train` would); `*record` gets the step's
// `--log-json` line: {"step", "loss", "lr", "tokens_per_sec", "bubble_fraction",
// "peak_bytes"} and "val_loss" after an evaluation.
//
// # Safety
// `trainer` is a live trainer; `record` is writable.
enum PipitStatus pipit_trainer_step(struct PipitTrainer *trainer, char **record);

// Train to the run's last step, calling `progress` (when not NULL) after each with its line
// and `user`; a nonzero return stops the run after that step with PIPIT_CANCELLED (the
// trainer stays usable). `*last` (when not NULL) gets the last step's line, or JSON null
// when no step was left.
//
// # Safety
// `trainer` is a live trainer; `last` is NULL or writable; `progress` is NULL or a function
// that may be called with `user`.
enum PipitStatus pipit_trainer_run(struct PipitTrainer *trainer,
                                   PipitProgress progress,
                                   void *user,
                                   char **last);

// The validation loss now (nats per token, over the run's `eval_tokens`) in `*loss`.
//
// # Safety
// `trainer` is a live trainer; `loss` is writable.
enum PipitStatus pipit_trainer_evaluate(struct PipitTrainer *trainer, double *loss);

// Save a checkpoint to the directory `dir` (UTF-8), as `pipit train --save` does.
//
// # Safety
// `trainer` is a live trainer; `dir` is a NUL-terminated string.
enum PipitStatus pipit_trainer_save(struct PipitTrainer *trainer, const char *dir);

// Free a trainer and everything it holds (NULL is ignored).
//
// # Safety
// `trainer` is NULL or a trainer from pipit_trainer_new not yet freed.
void pipit_trainer_free(struct PipitTrainer *trainer);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* PIPIT_H */
