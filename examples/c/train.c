/*
 * pipit from C: plan a pipeline, train a tiny GPT-2 cut into two stages with a progress
 * callback, evaluate it, save it, sample from it, and stop a second run early.
 *
 *     cargo build --release -p pipit-capi
 *     cc examples/c/train.c -Icapi/include -Ltarget/release -lpipit -Wl,-rpath,$PWD/target/release -o train
 *     ./train [CHECKPOINT_DIR]
 *
 * Options are pipit's command-line flags, with '_' for '-', as JSON or TOML text; results
 * come back as JSON text that the caller frees (see capi/include/pipit.h).
 */
#include <stdio.h>
#include <string.h>

#include "pipit.h"

/* The tiny run: `pipit train --backend cpu --n-layer 2 --n-embd 32 ... --steps 6 --lr 0.003`. */
static const char *RUN =
    "backend = \"cpu\"\n"
    "n_layer = 2\n"
    "n_embd = 32\n"
    "n_head = 2\n"
    "n_positions = 32\n"
    "seq_len = 32\n"
    "batch_size = 4\n"
    "stages = 2\n"
    "microbatches = 2\n"
    "steps = 6\n"
    "lr = 0.003\n"
    "warmup_steps = 0\n"
    "eval_every = 3\n"
    "eval_tokens = 512\n";

static int fail(const char *what, PipitStatus status) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, (int)status, pipit_last_error());
    return 1;
}

/* Prints each step's JSON line; never asks to stop. */
static int print_step(const char *record_json, void *user) {
    (void)user;
    printf("%s\n", record_json);
    return 0;
}

/* Asks to stop once the step count in `user` is reached. */
static int stop_after(const char *record_json, void *user) {
    int *left = user;
    (void)record_json;
    return --*left <= 0;
}

int main(int argc, char **argv) {
    PipitStatus status;
    if (strcmp(pipit_version(), PIPIT_VERSION) != 0) {
        fprintf(stderr, "header %s, library %s\n", PIPIT_VERSION, pipit_version());
        return 1;
    }

    char *plan = NULL;
    status = pipit_plan("{\"schedule\": \"1f1b\", \"stages\": 2, \"microbatches\": 4}", &plan);
    if (status != PIPIT_OK) return fail("pipit_plan", status);
    printf("plan %s\n", plan);
    pipit_string_free(plan);

    PipitTrainer *trainer = NULL;
    status = pipit_trainer_new(RUN, &trainer);
    if (status != PIPIT_OK) return fail("pipit_trainer_new", status);
    char *last = NULL;
    status = pipit_trainer_run(trainer, print_step, NULL, &last);
    if (status != PIPIT_OK) return fail("pipit_trainer_run", status);
    pipit_string_free(last);
    double loss = 0;
    status = pipit_trainer_evaluate(trainer, &loss);
    if (status != PIPIT_OK) return fail("pipit_trainer_evaluate", status);
    printf("val_loss %.6f\n", loss);
    if (argc > 1) {
        status = pipit_trainer_save(trainer, argv[1]);
        if (status != PIPIT_OK) return fail("pipit_trainer_save", status);
        printf("saved %s\n", argv[1]);
        char options[4096];
        snprintf(options, sizeof options,
                 "{\"checkpoint\": \"%s\", \"prompt\": \"ROMEO:\", \"max_tokens\": 16, "
                 "\"temperature\": 0, \"stages\": 2, \"backend\": \"cpu\"}",
                 argv[1]);
        char *sample = NULL;
        status = pipit_generate(options, &sample);
        if (status != PIPIT_OK) return fail("pipit_generate", status);
        printf("generated %s\n", sample);
        pipit_string_free(sample);
    }
    pipit_trainer_free(trainer);

    /* A second run, stopped by its callback after two steps. */
    status = pipit_trainer_new(RUN, &trainer);
    if (status != PIPIT_OK) return fail("pipit_trainer_new", status);
    int left = 2;
    status = pipit_trainer_run(trainer, stop_after, &left, NULL);
    printf("cancelled %d %s\n", (int)status, pipit_last_error());
    pipit_trainer_free(trainer);

    /* Bad input: a status and pipit's one-line message, and the library goes on. */
    status = pipit_trainer_new("{\"stages\": 0}", &trainer);
    printf("refused %d %s\n", (int)status, pipit_last_error());
    status = pipit_plan("{\"schedule\": \"1f1b\", \"stages\": 2, \"microbatchez\": 4}", &plan);
    printf("refused %d %s\n", (int)status, pipit_last_error());
    return 0;
}
