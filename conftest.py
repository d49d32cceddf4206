"""Session fixtures shared by tests/ and benchmarks/. Nothing here may reach the hub."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _private_store_cache(tmp_path_factory):
    """The runner prepares text into a user cache shared by all runs (~/.cache/fastlm): the tests' stores go
    to a cache of their own (subprocesses inherit it)."""
    os.environ["FASTLM_CACHE"] = str(tmp_path_factory.mktemp("fastlm_cache"))


@pytest.fixture(scope="module")
def one_rank_deepspeed():
    """DeepSpeed on one gloo rank, as the runner starts it under plain python: the rank's environment set for
    the module, DeepSpeed's shm op not built (only inference all-reduce uses it; ~30 s to compile). The
    process group stays up after the module: DeepSpeed keeps handles to its groups, and later engines (the
    runner's in-process runs) reuse it."""
    import socket
    import sys

    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port)).items():
            patch.setenv(name, value)
        patch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
        deepspeed.init_distributed(dist_backend="gloo")
        yield deepspeed


@pytest.fixture(scope="session")
def gpt2_tok():
    from tests.data import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def roberta_tok():
    from tests.data import roberta_tokenizer

    return roberta_tokenizer()


@pytest.fixture(scope="session")
def bert_tok():
    from tests.data import bert_tokenizer

    return bert_tokenizer()


# Test tiers. `make test` runs everything (what CI runs); `make test-fast` runs `pytest tests -m "not slow"`,
# the everyday loop (about a minute of CPU on 2 cores). Marked slow here rather than in each file, so the
# tiers are visible in one place:
# - the end-to-end runner tests: they launch the runner (run.main, a subprocess, the DeepSpeed launcher,
#   mp.spawn ranks) and train or evaluate a model. "*" is a whole module; a set names its tests (function
#   names, every parametrisation), the module's other tests being quick checks of the runner's parts;
# - library tests that take a second of CPU or more (a whole corpus through both encoders, every input
#   format, Trainer runs, subprocess CLIs), measured with --durations; the kernels' reference and golden
#   tests stay in the fast tier.
# A test renamed or moved out of these lists becomes fast: re-measure with `pytest -m "not slow" --durations=20`.
SLOW = {
    "test_run.py": "*",
    "test_hf_compat.py": "*",
    "test_node_local_cache.py": "*",
    # DeepSpeed engines and real tracker clients (wandb starts a service) in every test
    "test_safe_load.py": "*",
    "test_heads.py": "*",
    "test_trackers.py": "*",
    "test_muon.py": "*",  # training runs
    "test_parallel.py": "*",  # worker process pools
    "test_launch.py": {"test_every_launch_form_without_arguments_runs_the_demo"},
    "test_mixtures.py": {
        "test_a_mixture_run_logs_each_source_and_reports_its_blocks",
        "test_a_mixture_resumes_on_another_split_with_the_same_losses",
        "test_resuming_with_other_weights_is_refused_naming_the_mixtures",
    },
    "test_eval_sets.py": {"test_a_run_evaluates_each_set_with_bits_per_byte"},
    "test_cli.py": {
        "test_a_fallback_warning_is_one_line",
        "test_a_reader_that_stops_early_is_not_an_error",
        "test_bad_input_from_the_command_line",
        "test_inspect_prints_meta_and_decoded_documents",
        "test_prepare_prints_a_summary_and_makes_a_store",
    },
    "test_collators.py": {
        "test_first_epoch_and_set_epoch_masks_do_not_depend_on_the_worker_count",
        "test_new_masks_every_epoch_reproducibly_without_set_epoch",
        "test_trainer_trains_saves_the_tokenizer_and_the_model_loads",
        "test_trainer_without_callback_gets_new_reproducible_masks_each_epoch",
    },
    "test_encoding.py": {
        "test_hf_encoder_ignores_a_saved_truncation",
        "test_special_tokens_and_eos_frame_every_document",
        "test_tiktoken_equals_hf_on_all_of_wikitext2",
        "test_tiktoken_equals_hf_on_generated_text",
    },
    "test_fuzz_api.py": {
        "test_collators",
        "test_masking",
    },
    "test_packing.py": {
        "test_group_texts_inside_datasets_map_matches_the_tutorial",
    },
    "test_prepare.py": {
        "test_a_killed_prepare_leaves_no_valid_store",
        "test_a_later_row_without_the_text_field_is_named",
        "test_a_long_blank_line_is_skipped_like_any_blank_line_unless_blank_ones_are_kept",
        "test_a_long_line_is_encoded_in_pieces_with_the_whole_lines_ids",
        "test_a_long_line_is_refused_naming_file_and_line_when_it_cannot_be_cut",
        "test_a_store_loads_its_own_tokenizer_or_says_why_not",
        "test_adversarial_text_takes_the_tiktoken_path_with_the_tokenizers_ids",
        "test_bpe_vocab_and_merges_files",
        "test_corrupt_input_names_the_file",
        "test_csv_quote_that_is_never_closed_is_an_error",
        "test_csv_values_spanning_lines_across_read_batches",
        "test_dataset_with_several_splits_needs_one",
        "test_empty_input_is_an_error_and_writes_nothing",
        "test_every_format_round_trips",
        "test_invalid_utf8_in_structured_files_names_file_and_line_or_is_replaced",
        "test_invalid_utf8_names_file_and_line",
        "test_merge_equals_preparing_the_concatenated_input",
        "test_missing_source_and_existing_output",
        "test_missing_text_column_lists_the_columns_there_are",
        "test_paragraph_and_file_boundaries",
        "test_saved_tokenizer_loads_offline",
        "test_stores_are_identical_whatever_the_encoder_and_num_proc",
        "test_wikitext_raw_file_gives_the_tutorial_token_stream",
    },
    "test_tokenizer.py": {
        "test_gpt2_split_written_as_a_split_pre_tokenizer_qualifies",
        "test_what_disqualifies_a_byte_level_bpe",
    },
}


def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        module = Path(item.path).name
        modules[module] = item.module
        slow = SLOW.get(module, ())
        if slow == "*" or item.originalname in slow:
            item.add_marker(pytest.mark.slow)
    for module, namespace in modules.items():
        stale = sorted(name for name in SLOW.get(module, ()) if name != "*" and not hasattr(namespace, name))
        if stale:  # a renamed or moved test would silently join the fast tier
            config.issue_config_time_warning(pytest.PytestConfigWarning(
                f"conftest.py's SLOW names tests that {module} no longer has: {stale}"), stacklevel=2)
