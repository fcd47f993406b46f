"""The `moe-compile` command line, run for real: `main([...])` in process, and the installed entry point once.

Every error case checks the contract of the CLI: exit code 1 for a handled error (2 for a usage error), exactly
one line on stderr that names the problem, and no traceback unless --verbose.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_compile as mc
from moe_compile import cli, loading
from moe_compile.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, atomic
from moe_compile.cli import REPORT_NAME, main
from moe_compile.models import build_tiny_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "tiny-qwen3-moe"
    build_tiny_model("tiny-qwen3-moe").save_pretrained(directory)
    return directory


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moe-compile: error: ")
    return err


def test_inspect_and_dry_run_leave_the_model_directory_byte_identical(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)  # the same plan on a GPU machine
    before = tree_hashes(saved_model)
    assert main(["inspect", str(saved_model)]) == 0
    out = capsys.readouterr().out
    assert "Qwen3MoeForCausalLM: 2 found, 2 fusable" in out and out.count("│ proven │") == 2

    output = tmp_path / "out"
    assert main(["optimize", str(saved_model), "--dry-run", "--device", "cuda", "--dtype", "bfloat16",
                 "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "proven" in out and "softmax renorm" in out  # blocks and proven specs
    assert "cuda_graphs" in out and "unavailable" in out and "not in this version" in out  # features with reasons
    assert "detect -> prove -> rewrite -> verify -> emit:torch.compile" in out  # passes for a GPU target
    assert "weights in bfloat16" in out and "H100 80GB" in out and "KV cache" in out  # memory estimate
    assert "nothing was changed or written" in out
    assert tree_hashes(saved_model) == before
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_on_cpu_uses_the_machine_memory(capsys):
    assert main(["optimize", "tiny-mixtral", "--dry-run", "--device", "cpu", "--profile", "conservative"]) == 0
    out = capsys.readouterr().out
    assert "CPU memory" in out and "emit:eager" in out and "weights in float32" in out


def test_config_json_builds_random_weights_and_says_so(saved_model, capsys):
    assert main(["inspect", str(saved_model / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and out.count("│ proven │") == 2


@pytest.mark.parametrize("target", ["directory", "config.json"])
def test_a_model_too_large_for_memory_is_planned_from_structure(saved_model, target, monkeypatch, capsys):
    model = str(saved_model if target == "directory" else saved_model / "config.json")
    monkeypatch.setattr(loading, "_available_memory", lambda: 1024)
    assert main(["optimize", model, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "exceed this machine's free memory" in out and "2 found" in out
    assert "│ proven │" not in out and "│ ok     │" in out  # detected from structure, not proven
    assert "weights in float32" in out
    assert main(["optimize", model]) == 1
    assert "--dry-run" in error_line(capsys)


def test_missing_path_is_one_line_without_traceback_from_the_entry_point(tmp_path):
    missing = tmp_path / "no" / "such-model"
    script = Path(sys.executable).parent / "moe-compile"  # the console script pyproject.toml declares
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moe_compile.cli"]
    proc = subprocess.run([*command, "optimize", str(missing)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no such file or directory" in lines[0] and str(missing) in lines[0]


def test_verbose_adds_the_traceback(capsys):
    assert main(["inspect", "does-not-exist/model", "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ModelLoadError" in err


def test_unknown_model_name_lists_the_remedy(capsys):
    assert main(["inspect", "tiny-nonexistent"]) == 1
    assert "list-models" in error_line(capsys)


def test_directory_without_weights_points_at_its_config(saved_model, tmp_path, capsys):
    (tmp_path / "config.json").write_bytes((saved_model / "config.json").read_bytes())
    assert main(["inspect", str(tmp_path)]) == 1
    assert "config.json" in error_line(capsys)


def test_malformed_config_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "qwen3_moe", ')
    assert main(["inspect", str(bad)]) == 1
    assert "not a readable JSON config" in error_line(capsys)
    bad.write_text('{"model_type": "no_such_family"}')
    assert main(["inspect", str(bad)]) == 1
    assert "model_type" in error_line(capsys)


def test_unknown_profile_is_a_clean_error(capsys):
    assert main(["optimize", "tiny-qwen3-moe", "--profile", "fastest"]) == 1
    err = error_line(capsys)
    assert "unknown profile 'fastest'" in err and "balanced" in err


def test_forcing_an_unavailable_feature_is_a_clean_error(capsys):
    assert main(["optimize", "tiny-qwen3-moe", "--enable-specialize-phase"]) == 1
    err = error_line(capsys)
    assert "'specialize_phase'" in err and "--disable-specialize-phase" in err


def test_cuda_without_a_gpu_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    assert main(["optimize", "tiny-qwen3-moe", "--device", "cuda"]) == 1
    assert "--dry-run" in error_line(capsys)


@pytest.mark.parametrize("argv", [[], ["optimize"], ["optimize", "tiny-mixtral", "--no-such-flag"],
                                  ["optimize", "tiny-mixtral", "--backend", "tpu"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_feature_flags_override_the_profile(tmp_path, capsys):
    assert main(["optimize", "tiny-olmoe", "--profile", "conservative", "--disable-fuse-moe", "--enable-compile",
                 "--dry-run", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "passes: emit:torch.compile" in out  # no fusion stages, compiled emit


@pytest.fixture
def exported_models(monkeypatch) -> list[torch.nn.Module]:
    """Every model the CLI hands to export_for_cli, in order (the optimized model a checkpoint must reproduce)."""
    models = []
    real = cli.export_for_cli

    def spy(model, *args, **kwargs):
        models.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(cli, "export_for_cli", spy)
    return models


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_optimize_output_writes_a_checkpoint_that_load_restores(tmp_path, capsys, exported_models):
    output = tmp_path / "run"
    assert main(["optimize", "tiny-qwen3-moe", "--output", str(output)]) == 0
    assert "wrote the optimized checkpoint (safetensors)" in capsys.readouterr().out
    assert {p.name for p in output.iterdir()} == {"config.json", "generation_config.json", WEIGHTS_NAME,
                                                   MANIFEST_NAME, REPORT_NAME}
    report = json.loads((output / REPORT_NAME).read_text())
    assert report["result"]["fused"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report["plan"]["passes"][:2] == ["detect", "prove"] and "weights_bytes" in report["plan"]["memory"]
    assert REPORT_NAME in json.loads((output / MANIFEST_NAME).read_text())["files"]  # hashed with the weights
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging directory left behind

    loaded = mc.load(output)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(exported_models[0], ids), rtol=1e-5, atol=1e-5)
    assert loaded.moe_compile.fused == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_output_is_never_overwritten_without_force(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["optimize", "tiny-qwen3-moe", "--output", str(output)]) == 0
    capsys.readouterr()
    before = tree_hashes(output)
    assert main(["optimize", "tiny-qwen3-moe", "--profile", "conservative", "--output", str(output)]) == 1
    assert "--force" in error_line(capsys)
    assert main(["export", "tiny-qwen3-moe", str(output)]) == 1
    assert "OUT" in error_line(capsys)
    assert tree_hashes(output) == before

    assert main(["optimize", "tiny-qwen3-moe", "--profile", "conservative", "--output", str(output), "--force"]) == 0
    assert json.loads((output / REPORT_NAME).read_text())["result"]["profile"] == "conservative"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_write_leaves_no_output_directory(tmp_path, capsys, monkeypatch):
    def fail(path):
        if path.name == WEIGHTS_NAME:
            raise OSError("disk full")

    monkeypatch.setattr(atomic, "after_file_written", fail)
    assert main(["optimize", "tiny-qwen3-moe", "--output", str(tmp_path / "run")]) == 1
    assert "disk full" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_export_command_then_load_command(tmp_path, capsys, exported_models):
    output = tmp_path / "ckpt"
    assert main(["export", "tiny-qwen3-moe", str(output), "--profile", "conservative", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "safetensors" and manifest["optimize"]["profile"] == "conservative"
    assert json.loads((output / REPORT_NAME).read_text())["result"]["profile"] == "conservative"

    assert main(["load", str(output)]) == 0
    out = capsys.readouterr().out
    assert out.count("│ fused  │") == 2 and "profile 'conservative'" in out
    assert "loaded Qwen3MoeForCausalLM" in out and f"load:{output}" in out

    assert main(["inspect", str(output)]) == 1  # a checkpoint is not a MODEL: the error names the command
    assert "moe-compile load" in error_line(capsys)


def test_onnx_format_writes_a_model_onnx(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    output = tmp_path / "onnx"
    assert main(["optimize", "tiny-qwen3-moe", "--profile", "conservative", "--output", str(output),
                 "--format", "onnx"]) == 0
    assert "wrote the optimized checkpoint (onnx)" in capsys.readouterr().out
    assert (output / "model.onnx").stat().st_size > 0 and (output / REPORT_NAME).is_file()
    assert json.loads((output / MANIFEST_NAME).read_text())["kind"] == "onnx"
    assert main(["load", str(output)]) == 1
    assert "onnxruntime" in error_line(capsys)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("ckpt") / "ckpt"
    assert main(["export", "tiny-qwen3-moe", str(output), "--profile", "conservative"]) == 0
    return output


def test_load_of_a_tampered_checkpoint_is_one_line(cli_checkpoint, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in cli_checkpoint.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    data = bytearray((tampered / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x40
    (tampered / WEIGHTS_NAME).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["load", str(tampered)]) == 1
    assert WEIGHTS_NAME in error_line(capsys)

    (tampered / MANIFEST_NAME).unlink()
    assert main(["load", str(tampered)]) == 1
    assert MANIFEST_NAME in error_line(capsys)
    assert main(["load", str(tmp_path / "missing")]) == 1
    error_line(capsys)


def test_output_inside_the_model_directory_is_refused(saved_model, capsys):
    before = tree_hashes(saved_model)
    assert main(["optimize", str(saved_model), "--output", str(saved_model), "--force"]) == 1
    assert "overlaps the model" in error_line(capsys)
    assert tree_hashes(saved_model) == before


def test_list_models_and_profiles(capsys):
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-qwen3-moe" in out and "tiny-deepseek-v3" in out
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "conservative" in out and "sparsity-24" in out and "shared-expert fusion" in out


def test_gpus_runs_expert_parallel_processes_and_exports_the_placement(tmp_path):
    """`--gpus 2 --device cpu`: two torchrun processes (gloo), experts sharded, rank 0 prints the placement table
    and writes one checkpoint whose manifest holds the placement; loaded back it equals the original model."""
    out = tmp_path / "ep"
    proc = subprocess.run([sys.executable, "-m", "moe_compile.cli", "optimize", "tiny-qwen3-moe", "--device", "cpu",
                           "--gpus", "2", "--placement", "balanced", "--profile", "conservative", "--output", str(out)],
                          check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("expert placement on 2 ranks") == 1  # rank 0 alone speaks
    assert "2 CPU processes with gloo" in proc.stderr
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    placed = manifest["optimize"]["expert_parallel"]["placement"]["blocks"]
    assert len(placed) == 2 and all(len(b["placement"]["rank_experts"]) == 2 for b in placed.values())
    loaded = mc.load(out)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = build_tiny_model("tiny-qwen3-moe")(ids).logits
        assert (loaded(ids).logits - expected).abs().max().item() <= 1e-5


def test_gpus_must_be_positive(capsys):
    assert main(["optimize", "tiny-qwen3-moe", "--device", "cpu", "--gpus", "0"]) == 1
    assert "--gpus must be at least 1" in error_line(capsys)


def _save_word_tokenizer(directory: Path, vocab_size: int = 128) -> None:
    """A real (tokenizers) word-level tokenizer over the words w0..w126, saved beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)


def test_calibration_text_is_tokenized_and_gates_sparsity(tmp_path, capsys):
    """--calibration-text FILE with MODEL's own tokenizer: 2:4 by SparseGPT, measured by the gate on that text."""
    model_dir = tmp_path / "model"
    build_tiny_model("tiny-qwen3-moe").save_pretrained(model_dir)
    _save_word_tokenizer(model_dir)
    gen = torch.Generator().manual_seed(0)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"w{i}" for i in torch.randint(0, 127, (700,), generator=gen).tolist()))
    out = tmp_path / "out"
    assert main(["optimize", str(model_dir), "--device", "cpu", "--profile", "conservative", "--enable-sparsity-24",
                 "--calibration-text", str(text), "--output", str(out)]) == 0
    quality = json.loads((out / REPORT_NAME).read_text())["result"]["quality"]["sparsity_24"]
    assert quality["gated"] and quality["calibration"]["method"] == "sparsegpt"
    assert quality["calibration"]["tokens"] == 700


def test_calibration_text_needs_a_tokenizer_and_enough_tokens(saved_model, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("w1 w2 w3")
    assert main(["optimize", "tiny-qwen3-moe", "--device", "cpu", "--calibration-text", str(text)]) == 1
    assert "needs a tokenizer" in error_line(capsys)
    model_dir = tmp_path / "model"
    build_tiny_model("tiny-qwen3-moe").save_pretrained(model_dir)
    _save_word_tokenizer(model_dir)
    assert main(["optimize", str(model_dir), "--device", "cpu", "--calibration-text", str(text)]) == 1
    assert "gives 3 tokens" in error_line(capsys)
    assert main(["optimize", str(model_dir), "--device", "cpu", "--calibration-text", str(tmp_path / "none")]) == 1
    assert "no such file" in error_line(capsys)


def test_bench_speed_times_generate_before_and_after_optimize(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert cli.main(["bench", "--speed", "tiny-qwen3-moe", "--batches", "1,3", "--prompt", "8", "--steps", "4",
                     "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decode step" in text and "moe_compile balanced" in text and "reference" in text  # the CPU caveat
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["model"]) for r in rows] == [(1, "original"), (3, "original"), (1, "moe_compile balanced"),
                                                        (3, "moe_compile balanced")]
    for row in rows:
        assert row["decode_step_ms"] > 0 and row["prefill_ms"] > 0 and row["decode_tok_s"] > 0
    for row in rows[2:]:  # fp32 tiny model: the fused op gives the original's greedy tokens
        assert row["tokens_match"] == 1.0 and row["speedup"] > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", "--speed", "tiny-qwen3-moe", "--quality"], "choose one benchmark"),
    (["bench", "--speed", "tiny-qwen3-moe", "--batches", "1,x"], "expected comma-separated integers"),
    (["bench", "--speed", "tiny-qwen3-moe", "--steps", "1"], "at least 2"),
])
def test_bench_speed_refuses_bad_arguments(argv, message, capsys):
    assert cli.main(argv) == 1
    assert message in capsys.readouterr().err
