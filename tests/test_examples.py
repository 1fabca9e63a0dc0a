"""The example scripts run, end to end, with a small step count."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec

# Each test runs a script in a fresh process: seconds each.
pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run(script, *args, env=None):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Each script says what it is doing before its first (compiling) step, not a minute later.
    assert "compiling the training step" in result.stdout.split("step ", 1)[0] + "step", result.stdout
    return result.stdout


def final_loss(out):
    first, last = (float(x) for x in out.rsplit("loss ", 1)[1].split(" (")[0].split(" -> "))
    return first, last


def test_train_gpt_prints_the_report_and_the_loss_falls():
    out = run("train_gpt.py", "--steps", "60")
    assert "blocks.1.attn.query_proj.weight" in out and "no_decay" in out
    # jit returns a dict with its keys sorted
    assert re.search(r"step +60  loss [\d.]+  grad/norm/decay [\d.]+  grad/norm/no_decay [\d.]+", out), out
    first, last = final_loss(out)
    assert last < first - 1.0, out


@pytest.mark.parametrize("freeze", ["gradient", "optimizer"])
def test_lora_adds_adapters_to_q_and_v_trains_only_them_and_merges_them_back(freeze):
    out = run("lora_finetune.py", "--pretrain-steps", "20", "--steps", "20", "--freeze", freeze)
    assert re.search(r"^blocks\.1\.attn\.value_proj\s+Linear\s+2$", out, re.M), out
    assert f"freezing on the {freeze} side: 8 adapter leaves moved, nothing else" in out
    # Adam's two moments of the 2,048 adapter elements, and its step count.
    assert "optimizer state: 16,388 bytes" in out
    assert "merged: 4 adapters folded into Linear weights" in out


def test_vit_finetune_prints_the_treatment_table():
    out = run("vit_finetune.py", "--pretrain-steps", "20", "--steps", "30")
    header = r"^path\s+shape\s+label\s+lr@0\s+lr@10\s+lr@20\s+lr@29\s+wd@0\s+wd@10\s+wd@20\s+wd@29$"
    assert re.search(header, out, re.M), out
    number = r"[0-9.e-]+"
    # Blocks 0-1 train from step 20, blocks 2-3 from step 10, the head from the start (warmup: 0).
    assert re.search(
        rf"^blocks\.0\.attn\.qkv\.weight\s+\(96, 32\)\s+decay\s+frozen\s+frozen\s+{number}", out, re.M
    )
    assert re.search(rf"^blocks\.3\.mlp\.fc1\.weight\s+\(128, 32\)\s+decay\s+frozen\s+{number}", out, re.M)
    assert re.search(r"^head\.weight\s+\(4, 32\)\s+decay\s+0\s", out, re.M)
    assert re.search(r"^patch_embed\.proj\.weight\s.*\s0\.01$", out, re.M)
    assert re.search(r"^cls_token\s.*no_decay\s+frozen\s+frozen\s.*\s0$", out, re.M)
    assert "fine-tuned on 4 classes" in out


def test_scanned_gpt_freezes_the_first_layers():
    out = run("scanned_gpt.py", "--steps", "20")
    assert "[0.2621 0.3277 0.4096 0.512  0.64   0.8   ]" in out
    assert "layers 0-1 unchanged, layers 2-5 trained" in out
    first, last = final_loss(out)
    assert last < first, out


def test_sharded_train_on_8_host_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = run("sharded_train.py", "--steps", "3", env=env)
    spec = repr(PartitionSpec("model", None))  # its repr differs between JAX versions
    assert f"blocks.0.fc.weight (256, 64) -> {spec}, (64, 64) per device" in out
    assert "sharded and single-device losses agree over 3 steps" in out


def test_nnx_gpt_trains_with_presets_then_only_its_lora_adapters():
    out = run("nnx_gpt.py", "--steps", "40")
    assert "blocks.1.attn.query.kernel" in out and "ln_f.scale" in out  # paths without `.value`
    first, last = (float(x) for x in re.search(r"pretraining: loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first - 1.0, out
    assert re.search(r"^blocks\.1\.fc\s+LoRA\s+4$", out, re.M), out  # put in place by replace_modules
    assert re.search(r"LoRA: 2,560 trainable elements; Adam holds 5,120 floats of state", out), out
    assert "moved: 4 leaves, all adapters: True" in out


def test_haiku_gpt_decays_no_bias_and_no_layer_norm():
    out = run("haiku_gpt.py", "--steps", "40")
    rows = {
        line.split()[0]: line.split()[-2]
        for line in out.splitlines()
        if line.startswith(("block", "linear", "layer_norm", "embed", "~"))
    }
    assert rows["block.linear.b"] == "no_decay" and rows["block.layer_norm.scale"] == "no_decay"
    assert rows["block.linear.w"] == "decay" and rows["embed.embeddings"] == "decay"  # HF decays embeddings
    first, last = final_loss(out)
    assert last < first - 1.0, out


def test_finetune_from_checkpoint_continues_from_the_pretrained_loss(tmp_path):
    out = run("finetune_from_checkpoint.py", "--pretrain-steps", "30", "--steps", "5", "--out", str(tmp_path))
    pretrained = float(re.search(r"held-out loss ([\d.]+)", out).group(1))
    loaded = float(re.search(r"held-out LM loss ([\d.]+)", out).group(1))
    assert abs(pretrained - loaded) < 1e-3, out
    assert re.search(
        r"^blocks.1.attn.value_proj.weight +loaded +<- transformer.h.1.attn.c_attn.weight .*"
        r"via split\(3, 2, axis=-1\) then transpose$",
        out,
        re.M,
    ), out
    assert re.search(r"^space_head.weight +skipped", out, re.M), out
    assert re.search(
        r"^exported: model-00001-of-0000\d.safetensors, .*model.safetensors.index.json$", out, re.M
    )
    assert "exported the fine-tuned model to" in out

    # The docstring's command line runs as written, on the checkpoint `--out` kept.
    doc = (EXAMPLES / "finetune_from_checkpoint.py").read_text().split('"""')[1]
    command = re.search(r"^ +(treeglob load-plan .*?)$\n^ +(--rules .*)$", doc, re.M)
    argv = (command[1].rstrip("\\") + " " + command[2]).replace("/tmp/gpt2", str(tmp_path)).split()
    result = subprocess.run(
        [sys.executable, "-m", "treeglob", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^loaded +38 leaves", result.stdout, re.M), result.stdout
