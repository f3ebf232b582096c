"""Bad input on every command line: one line naming the problem, exit status 2, nothing touched.

One tiny finished run directory is shared by every case; each case tries to damage it (export
over it, resume it with another seed, read it as another kind...) and the run's checkpoints
and configs must be byte-identical afterwards. The argparse CLIs run in-process; the absl ones
(`train`, `aot`, whose flags are process-global) run in one subprocess that forks per case.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import RESUME_CONFIG_FILE

from effllm_jax import generate, plot, prune_posthoc, resume, train
from effllm_jax.evaluate import __main__ as evaluate_cli
from effllm_jax.export import __main__ as export_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def tree_hash(root) -> str:
    """One digest of every file name and byte under `root`."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _load_config(path):
    namespace = {}
    exec(compile(open(path).read(), path, "exec"), namespace)
    return namespace["get_config"]()


def _write_gguf(path):
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The shared run, its hash, and damaged or wrong inputs made from it."""
    tmp = tmp_path_factory.mktemp("bad")
    cfg = tmp / "run_config.py"
    cfg.write_text(RESUME_CONFIG_FILE)
    run = tmp / "run"
    train.run(_load_config(str(cfg)), str(run))
    from effllm_jax.export import export_run
    flax = str(tmp / "flax")
    export_run(str(run), flax, "flax")
    truncated_export = tmp / "truncated_export"  # a Flax export whose weights were cut short
    shutil.copytree(flax, truncated_export)
    weights = truncated_export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_spec = tmp / "no_spec"
    shutil.copytree(flax, no_spec)
    (no_spec / "spec.json").unlink()
    hf_no_weights = tmp / "hf_no_weights"  # an HF directory without its safetensors
    hf_no_weights.mkdir()
    (hf_no_weights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    no_checkpoint = tmp / "no_checkpoint"  # a run directory that saved nothing yet
    no_checkpoint.mkdir()
    shutil.copy(run / "config.json", no_checkpoint / "config.json")
    empty = tmp / "empty"
    empty.mkdir()
    not_empty = tmp / "not_empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("an earlier export")
    text = tmp / "notes.txt"
    text.write_text("not a model")
    gguf_path = str(tmp / "model.gguf")
    _write_gguf(gguf_path)
    truncated_gguf = tmp / "truncated.gguf"
    truncated_gguf.write_bytes(open(gguf_path, "rb").read()[:-1000])
    header_only_gguf = tmp / "header_only.gguf"
    header_only_gguf.write_bytes(open(gguf_path, "rb").read()[:40])
    names = dict(run=run, cfg=cfg, tmp=tmp, flax=flax, truncated_export=truncated_export,
                 no_spec=no_spec, hf_no_weights=hf_no_weights, no_checkpoint=no_checkpoint,
                 empty=empty, not_empty=not_empty, text=text, truncated_gguf=truncated_gguf,
                 header_only_gguf=header_only_gguf, missing=tmp / "missing")
    names = {k: str(v) for k, v in names.items()}
    return names, tree_hash(run), tree_hash(no_checkpoint)


CLIS = {"export": export_cli.main, "evaluate": evaluate_cli.main, "generate": generate.main,
        "plot": plot.main, "prune_posthoc": prune_posthoc.main}
EXPORT = ["--workdir={run}", "--out={tmp}/out"]
EVAL = ["--checkpoint={run}", "--tasks=copa"]
GEN = ["--model={run}", "--prompt=hi"]
POSTHOC = ["--source={run}", "--out={tmp}/pruned", "--method=taylor", "--target_fraction=0.5"]

IN_PROCESS = [  # (cli, argv, what the one line must say)
    ("export", ["--workdir={run}", "--out={not_empty}"], "is not empty; pass --overwrite"),
    ("export", ["--workdir={run}", "--out={run}"], "would replace the source"),
    ("export", ["--workdir={run}", "--out={run}", "--overwrite"], "would replace the source"),
    ("export", ["--workdir={run}", "--out={text}"], "is a file, not a directory"),
    ("export", ["--workdir={missing}", "--out={tmp}/out"], "does not exist"),
    ("export", ["--workdir={empty}", "--out={tmp}/out"], "is not a model"),
    ("export", ["--workdir={hf_no_weights}", "--out={tmp}/out"], "lacks its weights: no model.safetensors"),
    ("export", ["--workdir={no_checkpoint}", "--out={tmp}/out"], "has no checkpoint yet"),
    ("export", ["--workdir={no_spec}", "--out={tmp}/out"], "Flax export but lacks spec.json"),
    ("export", ["--workdir={truncated_export}", "--out={tmp}/out"], "model.safetensors is truncated"),
    ("export", ["--workdir={text}", "--out={tmp}/out"], "is a file but not GGUF"),
    ("export", ["--workdir={truncated_gguf}", "--out={tmp}/out"], "truncated.gguf is truncated"),
    ("export", ["--workdir={header_only_gguf}", "--out={tmp}/out"], "header_only.gguf is truncated"),
    ("export", EXPORT + ["--step=5"], "has no checkpoint step 5; saved steps: [4, 8]"),
    ("export", EXPORT + ["--round_to=0"], "argument --round_to: 0 must be >= 1"),
    ("export", EXPORT + ["--format=onnx"], "argument --format: invalid choice: 'onnx'"),
    ("export", ["--out={tmp}/out"], "the following arguments are required: --workdir"),
    ("evaluate", EVAL[:1] + ["--limit=-1"], "argument --limit: -1 must be >= 1"),
    ("evaluate", EVAL + ["--batch_size=0"], "argument --batch_size: 0 must be >= 1"),
    ("evaluate", ["--checkpoint={run}", "--tasks=nope"], "unknown task 'nope'"),
    ("evaluate", EVAL + ["--buckets=64,x"], "--buckets='64,x' is not a comma list"),
    ("evaluate", EVAL + ["--metrics=copa"], "--metrics entry 'copa' is not TASK=METRIC"),
    ("evaluate", EVAL + ["--text_file={missing}"], "--text_file="),
    ("evaluate", ["--checkpoint={missing}", "--tasks=copa"], "does not exist"),
    ("evaluate", ["--checkpoint={hf_no_weights}", "--tasks=copa"], "lacks its weights"),
    ("evaluate", ["--checkpoint={no_checkpoint}", "--tasks=copa"], "has no checkpoint yet"),
    ("generate", GEN + ["--max_new_tokens=-1"], "argument --max_new_tokens: -1 must be >= 1"),
    ("generate", GEN + ["--temperature=-1"], "argument --temperature: -1 must be >= 0"),
    ("generate", GEN + ["--top_p=1.5"], "argument --top_p: 1.5 must be in (0, 1]"),
    ("generate", ["--model={truncated_gguf}", "--prompt=hi"], "is truncated"),
    ("generate", ["--model={empty}", "--prompt=hi"], "is not a model"),
    ("generate", GEN, "text prompts need a tokenizer; this model has none"),
    ("plot", ["--workdir={missing}"], "run directory"),
    ("plot", ["--workdir={run}", "--compare", "{missing}"], "does not exist"),
    ("prune_posthoc", POSTHOC[:3], "give --target_params=N or --target_fraction in (0, 1]"),
    ("prune_posthoc", ["--source={run}", "--out={run}", "--method=taylor",
                       "--target_fraction=0.5"], "already holds a run"),
    ("prune_posthoc", POSTHOC + ["--calibration_batches=0"], "0 must be >= 1"),
    ("prune_posthoc", ["--source={hf_no_weights}"] + POSTHOC[1:], "lacks its weights"),
    ("prune_posthoc", ["--source={run}", "--out={tmp}/pruned", "--method=obd",
                       "--target_fraction=0.5"], "not a pruning method"),
]

T = ["--config={cfg}", "--workdir={run}"]
ABSL = [  # (cli, argv, what the one line must say); run in one forking subprocess
    ("train", T + ["--config.train.stepz=3"], "unknown config field train.stepz; did you mean train.steps?"),
    ("train", T + ["--config.optim.learning_rate=1"], "unknown config field optim.learning_rate"),
    ("train", ["--config={tmp}/nope.py", "--workdir={run}"], "--config={tmp}/nope.py: no such config file"),
    ("train", T + ["--config.train.steps=abc"], "flag --config.train.steps=abc"),
    ("train", T + ["--bogus"], "Unknown command line flag 'bogus'"),
    ("train", T + ["--config.train.checkpoint_every=0"], "train.checkpoint_every=0 must be >= 1"),
    ("train", T + ["--config.train.log_every=0"], "train.log_every=0 must be >= 1"),
    ("train", T + ["--config.optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    ("train", T + ["--config.train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be >= 1"),
    ("train", T + ["--config.model.num_heads=5"], "model.num_heads=5 is not divisible"),
    ("train", T + ["--config.model.rope_theta=0"], "model.rope_theta=0.0 must be > 0"),
    ("train", T + ["--config.train.seed=1"], "train.seed=0 (now 1)"),
    ("train", T + ["--config.data.kind=corpus"], 'data.kind="synthetic" (now "corpus")'),
    ("train", T + ["--config.data.vocab_size=100"], "data.vocab_size=128 (now 100)"),
    ("train", T + ["--config.model.ffn_dim=64"], "holds a run of a different model: model.ffn_dim=48 (now 64)"),
    ("train", T + ["--config.model.dtype=float16"], "model.dtype='float16'"),
    ("aot", ["--config={cfg}", "--config.train.lr=1"], "did you mean continued.lr or optim.lr?"),
    ("aot", ["--config={tmp}/nope.py"], "no such config file"),
]

DRIVER = r'''
import hashlib, json, os, sys
from effllm_jax import aot, train
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from test_bad_inputs import tree_hash
cases, run = json.loads(sys.argv[1]), sys.argv[2]
results = []
for i, (cli, argv) in enumerate(cases):
    err = os.path.join(sys.argv[3], f"{i}.err")
    pid = os.fork()
    if pid == 0:  # a fresh process per case: absl's flags are global
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        try:
            (train if cli == "train" else aot).cli([f"effllm_jax.{cli}"] + argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append([os.waitstatus_to_exitcode(status), open(err).read(), tree_hash(run)])
print(json.dumps(results))
'''


def _fill(argv, names):
    return [a.format(**names) for a in argv]


def _one_line(err: str) -> list[str]:
    """stderr's lines, less evaluate's timestamped progress lines."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[")]


@pytest.fixture(scope="module")
def absl_results(files, tmp_path_factory):
    names, _, _ = files
    cases = [(cli, _fill(argv, names)) for cli, argv, _ in ABSL]
    cases.append(("train", _fill(T + ["--config.train.seed=1", "--debug"], names)))
    out = tmp_path_factory.mktemp("absl")
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases), names["run"],
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cli, argv, message", IN_PROCESS,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(IN_PROCESS)])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(files, cli, argv, message, capsys):
    names, run_hash, no_checkpoint_hash = files
    try:
        code = CLIS[cli](_fill(argv, names))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = _one_line(err)
    assert code == 2, err
    assert len(lines) == 1 and "error:" in lines[0], err
    assert message.format(**names) in lines[0], lines[0]
    assert tree_hash(names["run"]) == run_hash
    assert tree_hash(names["no_checkpoint"]) == no_checkpoint_hash  # readers create nothing
    assert not os.path.exists(os.path.join(names["tmp"], "out"))
    assert not os.path.exists(os.path.join(names["tmp"], "pruned", "checkpoints"))


@pytest.mark.parametrize("index", range(len(ABSL)),
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(ABSL)])
def test_absl_cli_bad_input_is_one_line_exit_2_and_touches_nothing(files, absl_results, index):
    names, run_hash, _ = files
    code, err, after = absl_results[index]
    lines = _one_line(err)
    assert code == 2, err
    assert len(lines) == 1 and "error:" in lines[0], err
    assert ABSL[index][2].format(**names) in lines[0], lines[0]
    assert after == run_hash


def test_debug_shows_the_traceback(files, absl_results, capsys):
    names, run_hash, _ = files
    code, err, after = absl_results[-1]  # train --debug, resuming with another seed
    assert code == 1 and "Traceback" in err and "ResumeError" in err and after == run_hash
    with pytest.raises(ValueError, match="is not a model"):
        export_cli.main(_fill(["--workdir={empty}", "--out={tmp}/out", "--debug"], names))
    assert tree_hash(names["run"]) == run_hash


def test_allowed_config_change_is_logged_and_versioned(files, tmp_path, capsys):
    names, _, _ = files
    run = tmp_path / "run"
    shutil.copytree(names["run"], run)
    first = (run / "config.json").read_bytes()
    config = _load_config(names["cfg"])
    config.train.seed = 1
    with pytest.raises(resume.ResumeError, match="--allow_config_change"):
        train.run(config, str(run))
    train.run(config, str(run), allow_config_change=True)
    out = capsys.readouterr().out
    assert "resuming with a changed config (--allow_config_change): train.seed=0 (now 1)" in out
    assert f"resuming {run} from step 8" in out
    assert (run / "config.json").read_bytes() == first  # the first config is kept
    assert json.loads((run / "config.1.json").read_text())["train"]["seed"] == 1
    train.run(config, str(run), allow_config_change=True)  # the same config: no new version
    assert sorted(p.name for p in run.glob("config*.json")) == ["config.1.json", "config.json"]


def test_export_overwrite_replaces_the_directory_whole(files, tmp_path):
    names, run_hash, _ = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("stale")  # a file only the earlier export had
    assert export_cli.main([f"--workdir={names['run']}", f"--out={out}", "--overwrite"]) == 0
    assert not (out / "tokenizer.json").exists() and (out / "export.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left
    assert tree_hash(names["run"]) == run_hash


def test_readers_create_nothing(files, tmp_path):
    names, _, _ = files
    run = tmp_path / "no_checkpoint"
    shutil.copytree(names["no_checkpoint"], run)
    assert resume.check(str(run), _load_config(names["cfg"])) is None  # a new run
    from effllm_jax import checkpoint
    reader = checkpoint.Checkpointer(str(run), read_only=True)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        reader.restore_meta()
    reader.close()
    assert [p.name for p in run.iterdir()] == ["config.json"]  # no checkpoints/ made
