"""lm-eval: the sparse_hf model on a 3-example generated task, with the sparse path really running."""

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from sparse_prefill.eval.archs import byte_tokenizer  # noqa: E402
from sparse_prefill.eval.lm_harness import SparseHFLM, task_dataset, tasks_dir  # noqa: E402
from sparse_prefill.eval.recording import LayoutRecorder, intercept_layouts  # noqa: E402
from sparse_prefill.patches import is_patched  # noqa: E402


def test_sparse_hf_runs_a_generated_task_with_sparse_prefill():
    lm = SparseHFLM(pretrained="sparse-prefill-tiny", device="cpu", min_seq_len=0, block_size=64,
                    min_budget_tokens=64, batch_size=1)
    assert is_patched(lm.model) and lm.max_length == lm.model.config.max_position_embeddings
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False,  # indexing 14K built-ins: 60 s
                          metadata={"pretrained": "sparse-prefill-tiny", "max_seq_lengths": [384], "num_samples": 3})
    recorder = LayoutRecorder(2)
    with intercept_layouts(lm.model, recorder):
        results = simple_evaluate(model=lm, tasks=["sparse_niah"], task_manager=manager,
                                  gen_kwargs="max_gen_toks=4")
    assert results["n-samples"]["sparse_niah"]["effective"] == 3
    assert 0.0 <= results["results"]["sparse_niah"]["score,none"] <= 1.0
    assert recorder.sparse_layers == 2  # prefill went through the sparse path


def test_task_dataset_builds_lengths_times_samples_docs():
    docs = task_dataset("passkey", pretrained="sparse-prefill-tiny", max_seq_lengths="400,500", num_samples=2,
                        depths=[0.0, 1.0])["test"]
    assert len(docs) == 4 and docs["max_length"] == [400, 400, 500, 500] and docs["depth"] == [0.0, 1.0, 0.0, 1.0]
    tok = byte_tokenizer()
    assert len(tok(docs[0]["input"], add_special_tokens=False)["input_ids"]) == 400
    assert docs[0]["outputs"][0] in docs[0]["input"]
    with pytest.raises(ValueError, match="pretrained"):
        task_dataset("passkey")


def test_our_task_folder_joins_the_include_path_users_give():
    from sparse_prefill.eval.lm_harness import _with_our_tasks

    ours = str(tasks_dir())
    assert _with_our_tasks(["--tasks", "x"]) == ["--tasks", "x", "--include_path", ours]
    assert _with_our_tasks(["--include_path", "/mine", "--tasks", "x"]) == ["--include_path", f"/mine:{ours}",
                                                                          "--tasks", "x"]
    assert _with_our_tasks(["--include_path=/mine"]) == [f"--include_path=/mine:{ours}"]
    assert _with_our_tasks(["--help"]) == ["--help"]


def test_model_args_go_through_the_config_parser():
    lm = SparseHFLM.create_from_arg_string("pretrained=sparse-prefill-tiny,proxy_heads=q,gamma=0.9,min_seq_len=none",
                                           {"device": "cpu", "batch_size": 1})
    assert (lm.sparse_config.proxy_heads, lm.sparse_config.gamma, lm.sparse_config.min_seq_len) == ("q", 0.9, None)
    assert lm.sparse_config.block_size == 128 and is_patched(lm.model)  # fields not given keep their defaults
    with pytest.raises(ValueError, match="proxy_heads='x'"):
        SparseHFLM.create_from_arg_string("pretrained=sparse-prefill-tiny,proxy_heads=x", {"device": "cpu"})
    with pytest.raises(ValueError, match="Unknown SparsePrefillConfig field 'gama'.*gamma"):
        SparseHFLM.create_from_arg_string("pretrained=sparse-prefill-tiny,gama=0.9", {"device": "cpu"})
