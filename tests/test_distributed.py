"""Data parallelism on 2 gloo processes equals one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bind.bench.ddp import check_recipe, compare_with_single_process
from bind.data.pairs import EpochSampler


def test_rank_slices_concatenate_to_the_single_process_batches():
    single = [i for _, i in EpochSampler(50, seed=1)]
    ranks = [[i for _, i in EpochSampler(50, seed=1, batch_size=4, rank=r, world_size=3)] for r in range(3)]
    assert all(len(r) == 4 * 4 for r in ranks)  # 4 full global batches of 12; the last 2 items dropped
    for step in range(4):
        merged = [i for r in ranks for i in r[step * 4 : (step + 1) * 4]]
        assert merged == single[step * 12 : (step + 1) * 12]


@pytest.mark.parametrize(("local_loss", "chunk_size"), [(False, None), (True, 4)])
def test_two_gloo_processes_give_the_single_process_loss_and_gradients(data_root, local_loss, chunk_size):
    figures = compare_with_single_process(check_recipe(str(data_root), 16, local_loss, chunk_size), nproc=2)
    assert figures["parameters_compared"] > 10  # the audio transformer, its head and logit scale
    assert figures["loss_diff"] < 1e-5
    # float32 rounding, relative to the largest gradient (~8): one process computes b->a logits as the transpose of
    # a->b, each rank of a local loss multiplies its own rows (as open_clip does), in another order
    assert figures["max_grad_diff"] < 2e-6 * figures["max_grad"]
    assert figures["max_grad"] > 1e-3  # gradients that are not all zero


def test_bindkit_run_nproc_2_trains_like_one_process(tmp_path, data_root):
    recipe = check_recipe(str(data_root), 16, local_loss=True, chunk_size=None)
    recipe["stages"][0]["steps"] = 3
    for modality in recipe["modalities"].values():
        modality["eval_data"] = {**modality["train_data"], "split": "eval"}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))  # no YAML anchors for shared parts
    weights = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        cmd = [
            sys.executable,
            "-m",
            "bind",
            "run",
            str(path),
            "--out",
            str(out),
            "--nproc",
            str(nproc),
            "--no-progress",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("class-match retrieval") == 1  # only rank 0 reports
        weights[nproc] = load_file(str(out / "model.safetensors"))
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert sum('"stage": "eval"' in line for line in lines) == 1  # one writer
    key_bias = "encoders.audio.trunk.blocks.0.self_attn.in_proj_bias"
    for key, tensor in weights[1].items():
        if key == key_bias:
            # attention's key bias shifts every score of a query equally, so softmax ignores it: its exact
            # gradient is 0 and Adam turns float rounding (1e-9) into lr-sized steps. Query and value parts only.
            tensor, weights[2][key] = tensor.view(3, -1)[[0, 2]], weights[2][key].view(3, -1)[[0, 2]]
        torch.testing.assert_close(weights[2][key], tensor, atol=1e-5, rtol=0, msg=key)


# ---- more than one machine: torchrun's c10d rendezvous, and elastic restarts --------------------------------
def tiny_recipe_file(tmp_path, data_root, steps: int) -> Path:
    recipe = check_recipe(str(data_root), 16, local_loss=True, chunk_size=None)
    recipe["stages"][0]["steps"] = steps
    recipe["checkpoint_every"] = 1
    recipe["keep_checkpoints"] = 50
    for modality in recipe["modalities"].values():
        modality["eval_data"] = {**modality["train_data"], "split": "eval"}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_training(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        ta, tb = wa[key], wb[key]
        if key == "encoders.audio.trunk.blocks.0.self_attn.in_proj_bias":  # its key part: see the test above
            ta, tb = ta.view(3, -1)[[0, 2]], tb.view(3, -1)[[0, 2]]
        torch.testing.assert_close(tb, ta, atol=1e-5, rtol=0, msg=key)


def test_two_nodes_on_loopback_through_c10d_rendezvous_train_like_one_machine(tmp_path, data_root):
    """2 nodes x 1 process: the README's multi-node commands, both "machines" on 127.0.0.1."""
    path = tiny_recipe_file(tmp_path, data_root, steps=3)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for _ in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=bindkit-test",
            "-m", "bind", "run", str(path), "--out", str(tmp_path / "two-nodes"), "--no-progress",
        ]  # fmt: skip
        nodes.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        )
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:  # a hung rendezvous must not outlive the test
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert sum(out.count("class-match retrieval") for out, _ in outputs) == 1  # one global rank 0 reports
    single = subprocess.run(
        [sys.executable, "-m", "bind", "run", str(path), "--out", str(tmp_path / "one-machine"), "--nproc", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    assert_same_training(tmp_path / "one-machine", tmp_path / "two-nodes")


def worker_pids(agent: int) -> dict[int, int]:
    """RANK -> pid of the workers under a torchrun agent, read from /proc."""
    found, todo = {}, [agent]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        todo += [int(c) for c in children]
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if pid != agent and rank:
            found[int(rank[0].split(b"=")[1])] = pid
    return found


def test_a_killed_worker_restarts_the_job_from_the_newest_checkpoint(tmp_path, data_root):
    """torchrun --max-restarts 1: rank 1 is killed mid-run; the restarted workers resume by themselves
    (no --resume) and end with the weights of an uninterrupted run. (Before bind.distributed prefixed the store's
    keys with the attempt, a restarted worker could read the dead one's address and hang in gloo's connect.)"""
    from bind.train.checkpoint import list_checkpoints

    path = tiny_recipe_file(tmp_path, data_root, steps=12)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = ["-m", "bind", "run", str(path), "--no-progress", "--out"]
    whole = subprocess.run([*torchrun, *run, str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    agent = subprocess.Popen(
        [*torchrun, "--max-restarts=1", *run, str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(list_checkpoints(out / "checkpoints")) < 2:  # two steps done: the kill lands mid-stage
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-2000:]
            time.sleep(0.05)
        os.kill(worker_pids(agent.pid)[1], signal.SIGKILL)
        stdout, stderr = agent.communicate(timeout=180)
    finally:  # a hung job must not outlive the test
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 0, stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["from_step"] >= 2  # continued, not started over
    assert_same_training(tmp_path / "whole", out)
