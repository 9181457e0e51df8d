"""Checkpoint/resume on real gloo processes.

Oracles: the weights and AdamW moments gathered to full tensors (``gather_full_state_dict``) before
saving; the uninterrupted run's next step (resume must reproduce it bit for bit at the same layout);
RNG draws taken right after saving; the directory listing after keep-last and after a SIGKILL.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from clipo_nemo.parallel.launcher import DistributedRunError, run_distributed
from clipo_nemo.trainer.equivalence import make_global_batch, tiny_check_config

TIMEOUT_S = 240


def _cfg(tp=1, pp=1, head_mode="replicated"):
    cfg = tiny_check_config()  # 4 layers, H=64, KL on (so a reference policy exists), head D=16
    cfg.actor.optimizer, cfg.actor.lr, cfg.actor.weight_decay = "adamw", 1e-2, 0.01
    cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size = tp, pp
    cfg.contrastive.head.tp_mode = head_mode
    return cfg


def _build(cfg):
    from clipo_nemo.parallel.state import init_parallel_state
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.trainer.step import ClipoHead

    init_parallel_state(cfg.parallel)
    actor, clipo = Actor.build(cfg), ClipoHead.build(cfg)
    actor.sync_reference()
    return actor, clipo


def _learn(actor, clipo, cfg, step):
    """One CLIPO step on a fixed global batch (this rank's DP share); moves policy, head and moments."""
    from megatron.core import parallel_state

    from clipo_nemo.trainer.step import Experience, learn_from_experience

    tokens, mask, scores, groups = make_global_batch(cfg, seed=step)
    rows = torch.arange(len(scores)).chunk(parallel_state.get_data_parallel_world_size())[
        parallel_state.get_data_parallel_rank()]
    learn_from_experience(actor, clipo, Experience(tokens[rows], mask[rows], scores[rows], groups[rows], rows), cfg, step)


@contextlib.contextmanager
def _params_hold(module, optimizer, moment):
    """Temporarily make every parameter's data its optimizer ``moment`` (to gather moments like weights)."""
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [p.data for p in params]
    for p in params:
        p.data = optimizer.state[p][moment]
    try:
        yield
    finally:
        for p, data in zip(params, saved):
            p.data = data


def _snapshot(actor, clipo, cfg):
    """Full (TP/PP-gathered) weights, AdamW moments, head weights and log-probs of a fixed batch."""
    from megatron.core import parallel_state

    from clipo_nemo.models.forward import PolicyBatch
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.trainer.actor import broadcast_from_last_stage

    vocab = cfg.model.vocab_size
    snap = {"policy": gather_full_state_dict(actor.module, vocab),
            "reference": gather_full_state_dict(actor.reference, vocab)}
    for moment in ("exp_avg", "exp_avg_sq"):
        with _params_hold(actor.module, actor.optimizer, moment):
            snap[moment] = gather_full_state_dict(actor.module, vocab)
    tokens, mask, _, _ = make_global_batch(cfg, seed=99)
    out = actor.old_outputs(PolicyBatch(tokens, mask))
    last = parallel_state.is_pipeline_last_stage()
    snap["logprobs"] = broadcast_from_last_stage(out.logprobs if last else None)
    snap["head"] = broadcast_from_last_stage(clipo.head.full_state_dict() if last else None)
    head_params = list(clipo.head.parameters())
    snap["head_step"] = broadcast_from_last_stage(float(clipo.optimizer.state[head_params[0]]["step"]) if last else None)
    snap["policy_step"] = float(actor.optimizer.state[next(actor.module.parameters())]["step"])
    return snap


def _rng_draws():
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return {"torch": torch.rand(3), "python": random.random(), "numpy": np.random.rand(3), "tracker": tracked}


def _ours(caught):
    from clipo_nemo.checkpoint.recovery import CheckpointWarning

    return [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def _zero_all(actor, clipo):
    """Wipe every weight so that a load that forgets something shows up."""
    with torch.no_grad():
        for module in (actor.module, actor.reference, clipo.head):
            for p in module.parameters():
                p.zero_()


# --------------------------------------------------------------------------------------------------
# Rank functions (module level: spawned processes import them)
# --------------------------------------------------------------------------------------------------
def _save_rank(rank, world, cfg, run_dir, asynchronous=False):
    """Two steps, save after step 1 (the checkpoint under test), then continue: the uninterrupted run.
    ``asynchronous``: step 2 trains (changing every weight and moment in place) while step 1 is written."""
    from clipo_nemo.parallel.state import destroy_parallel_state
    from clipo_nemo.checkpoint.recovery import checkpoints_dir
    from clipo_nemo.checkpoint.save import save_checkpoint, wait_for_pending_save

    try:
        actor, clipo = _build(cfg)
        _learn(actor, clipo, cfg, step=1)
        state = {"step": 1, "epoch": 0, "sampler": {"epoch": 0, "batch_in_epoch": 1}}
        save_checkpoint(run_dir, 1, actor, clipo, state, keep_last=3, asynchronous=asynchronous)
        saved = _snapshot(actor, clipo, cfg)
        draws = _rng_draws()
        _learn(actor, clipo, cfg, step=2)
        published_while_training = (checkpoints_dir(run_dir) / "step_1").exists()
        wait_for_pending_save()
        return {"saved": saved, "draws": draws, "continued": _snapshot(actor, clipo, cfg),
                "published_while_training": published_while_training}
    finally:
        destroy_parallel_state()


def _resume_same_layout_rank(rank, world, cfg, run_dir):
    from clipo_nemo.parallel.state import destroy_parallel_state
    from clipo_nemo.checkpoint.load import load_checkpoint

    try:
        actor, clipo = _build(cfg)
        _zero_all(actor, clipo)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = load_checkpoint(run_dir, actor, clipo)
        loaded = _snapshot(actor, clipo, cfg)
        draws = _rng_draws()
        _learn(actor, clipo, cfg, step=2)
        return {"state": state, "loaded": loaded, "draws": draws, "continued": _snapshot(actor, clipo, cfg),
                "warnings": _ours(caught)}
    finally:
        destroy_parallel_state()


def _reshard_rank(rank, world, cfg, load_path, save_dir):
    """Load a checkpoint at this (other) layout; optionally save it again from here."""
    from clipo_nemo.parallel.state import destroy_parallel_state
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.checkpoint.save import save_checkpoint

    try:
        actor, clipo = _build(cfg)
        _zero_all(actor, clipo)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = load_checkpoint(None, actor, clipo, path=load_path)
        result = {"state": state, "loaded": _snapshot(actor, clipo, cfg), "warnings": _ours(caught)}
        if save_dir is not None:
            save_checkpoint(save_dir, 5, actor, clipo, state, keep_last=1)
        return result
    finally:
        destroy_parallel_state()


def _single_loads_rank(rank, world, cfg, paths):
    """TP=1 PP=1: load each checkpoint in turn into the same objects."""
    from clipo_nemo.parallel.state import destroy_parallel_state
    from clipo_nemo.checkpoint.load import load_checkpoint

    try:
        actor, clipo = _build(cfg)
        results = []
        for path in paths:
            _zero_all(actor, clipo)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state = load_checkpoint(None, actor, clipo, path=path)
            results.append({"state": state, "loaded": _snapshot(actor, clipo, cfg),
                            "warnings": _ours(caught)})
        return results
    finally:
        destroy_parallel_state()


def _assert_same(expected, actual, what, exact=True):
    assert expected.keys() == actual.keys(), f"{what}: keys differ"
    for name in expected:
        if exact:
            assert torch.equal(expected[name], actual[name]), f"{what}: {name} differs"
        else:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5, msg=f"{what}: {name}")


def _assert_weights_and_moments(saved, loaded, exact_logprobs):
    for part in ("policy", "reference", "exp_avg", "exp_avg_sq", "head"):
        _assert_same(saved[part], loaded[part], part)
    assert loaded["policy_step"] == saved["policy_step"] and loaded["head_step"] == saved["head_step"]
    if exact_logprobs:
        assert torch.equal(loaded["logprobs"], saved["logprobs"])
    else:  # another TP/PP split sums in another order
        torch.testing.assert_close(loaded["logprobs"], saved["logprobs"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """A TP=2 run (column-parallel head) that saved step 1 and then went on to step 2."""
    run_dir = tmp_path_factory.mktemp("tp2_run")
    ranks = run_distributed(_save_rank, 2, args=(_cfg(tp=2, head_mode="column"), str(run_dir)), timeout_s=TIMEOUT_S)
    saved = ranks[0]["saved"]
    # The oracle is not trivial: the step moved the policy away from the reference, and Adam has moments.
    assert any(not torch.equal(saved["policy"][k], saved["reference"][k]) for k in saved["policy"])
    assert saved["policy_step"] == 1.0 and saved["head_step"] == 1.0
    assert max(t.abs().max() for t in saved["exp_avg"].values()) > 0
    return run_dir, ranks


def _assert_exact_resume(run_dir, saved_ranks, cfg):
    ranks = run_distributed(_resume_same_layout_rank, 2, args=(cfg, str(run_dir)), timeout_s=TIMEOUT_S)
    for rank, (before, after) in enumerate(zip(saved_ranks, ranks)):
        assert after["state"] == {"step": 1, "epoch": 0, "sampler": {"epoch": 0, "batch_in_epoch": 1}}
        assert after["warnings"] == []
        _assert_weights_and_moments(before["saved"], after["loaded"], exact_logprobs=True)
        # RNG streams continue exactly where the saving rank's did (each rank its own tracker stream).
        for name, value in before["draws"].items():
            assert np.array_equal(np.asarray(value), np.asarray(after["draws"][name])), f"rank {rank}: {name} RNG"
        # The next step after resuming equals the uninterrupted run's, bit for bit.
        _assert_weights_and_moments(before["continued"], after["continued"], exact_logprobs=True)


def test_same_layout_resume_is_exact(tp2_run):
    run_dir, saved_ranks = tp2_run
    _assert_exact_resume(run_dir, saved_ranks, _cfg(tp=2, head_mode="column"))
    tracker = [r["draws"]["tracker"] for r in saved_ranks]
    assert not torch.equal(tracker[0], tracker[1])  # the per-TP-rank streams were really per rank


def _saved_keys(dist_dir):
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(dist_dir)).read_metadata().state_dict_metadata)


def test_async_parallel_save_on_two_dp_ranks_resumes_exactly(tmp_path):
    """DP=2: every tensor has two replicas; each rank writes about half of the checkpoint, in the
    background while the next step trains; the resumed run still equals the uninterrupted one."""
    cfg = _cfg()
    saved_ranks = run_distributed(_save_rank, 2, args=(cfg, str(tmp_path), True), timeout_s=TIMEOUT_S)
    assert not any(r["published_while_training"] for r in saved_ranks)  # save returned before the write ended
    step1 = tmp_path / "checkpoints" / "step_1"
    written = {rank: sum(f.stat().st_size for f in (step1 / "dist").glob(f"__{rank}_*.distcp")) for rank in (0, 1)}
    assert min(written.values()) > 0.3 * sum(written.values()), written
    _assert_exact_resume(tmp_path, saved_ranks, cfg)


def test_pp2_run_saves_and_resumes_exactly(tmp_path):
    """PP=2 trained from scratch: the head trains on the last stage only, so the first stage's head
    optimizer has no moments; the save must still work and the resume equal the uninterrupted run."""
    cfg = _cfg(pp=2)
    saved_ranks = run_distributed(_save_rank, 2, args=(cfg, str(tmp_path)), timeout_s=TIMEOUT_S)
    _assert_exact_resume(tmp_path, saved_ranks, cfg)


def test_reference_is_a_checked_pointer_not_a_copy(tp2_run, tmp_path):
    """The step checkpoint holds no reference.* tensors; meta.json points to reference/ with its
    SHA-256; a changed byte there stops the load."""
    run_dir, _ = tp2_run
    step1 = run_dir / "checkpoints" / "step_1"
    assert not any(key.startswith("reference.") for key in _saved_keys(step1 / "dist"))
    reference = run_dir / "checkpoints" / "reference" / "dist"
    assert any(key.startswith("reference.") for key in _saved_keys(reference))
    pointer = json.loads((step1 / "meta.json").read_text())["reference"]
    assert pointer["kind"] == "dist" and pointer["path"] == "reference/dist"
    assert pointer["sha256"] == hashlib.sha256(_directory_bytes(reference)).hexdigest()

    copy = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", copy)
    shard = sorted((copy / "reference" / "dist").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    errors = run_distributed(_load_error_rank, 1, args=(_cfg(), str(copy / "step_1")), timeout_s=TIMEOUT_S)
    assert "reference policy" in errors[0] and "changed since it was saved" in errors[0], errors[0]


def _directory_bytes(path):
    """The byte string clipo_nemo.checkpoint.reference.directory_sha256 hashes, rebuilt here as the oracle."""
    out = b""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        out += str(file.relative_to(path)).encode() + b"\0" + file.read_bytes()
    return out


def _load_error_rank(rank, world, cfg, path):
    from clipo_nemo.parallel.state import destroy_parallel_state
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.checkpoint.recovery import CheckpointError

    try:
        actor, clipo = _build(cfg)
        try:
            load_checkpoint(None, actor, clipo, path=path)
        except CheckpointError as err:
            return str(err)
        return "loaded"
    finally:
        destroy_parallel_state()


def test_tp2_and_pp2_checkpoints_load_at_other_layouts(tp2_run, tmp_path):
    """TP=2 (column head) -> PP=2 (replicated head) -> saved again at PP=2 -> TP=1: every copy equals
    the weights and Adam moments the TP=2 run gathered before saving."""
    run_dir, saved_ranks = tp2_run
    saved = saved_ranks[0]["saved"]
    step1 = str(run_dir / "checkpoints" / "step_1")
    pp2_dir = tmp_path / "pp2_run"
    pp2 = run_distributed(_reshard_rank, 2, args=(_cfg(pp=2), step1, str(pp2_dir)), timeout_s=TIMEOUT_S)
    for result in pp2:
        _assert_weights_and_moments(saved, result["loaded"], exact_logprobs=False)
        assert result["state"]["step"] == 1
    assert any("RNG" in w for w in pp2[0]["warnings"])  # layout changed: RNG states skipped, said so
    assert (pp2_dir / "checkpoints" / "latest").read_text() == "step_5"

    single = run_distributed(_single_loads_rank, 1, args=(_cfg(), [step1, str(pp2_dir / "checkpoints" / "step_5")]),
                             timeout_s=TIMEOUT_S)[0]
    for result in single:
        _assert_weights_and_moments(saved, result["loaded"], exact_logprobs=False)
        assert any("RNG" in w for w in result["warnings"])
    meta = json.loads((pp2_dir / "checkpoints" / "step_5" / "meta.json").read_text())
    assert meta["layout"] == {"world_size": 2, "tp": 1, "pp": 2, "dp": 1} and meta["head"]["tp_mode"] == "replicated"


# --- kill during save, keep-last ------------------------------------------------------------------
def _saves_then_killed_rank(rank, world, cfg, run_dir):
    """Save steps 1-3 (keep_last=2), record step 3's weights, then die by SIGKILL in the middle of
    saving step 4: after the sharded weights and RNG files are written, before meta.json."""
    from clipo_nemo.checkpoint import save
    from clipo_nemo.checkpoint.recovery import checkpoints_dir

    actor, clipo = _build(cfg)
    listings = []
    for step in (1, 2, 3):
        _learn(actor, clipo, cfg, step)
        save.save_checkpoint(run_dir, step, actor, clipo, {"step": step}, keep_last=2)
        listings.append(sorted(p.name for p in checkpoints_dir(run_dir).iterdir()))
    torch.save({"listings": listings, "step3": _snapshot(actor, clipo, cfg)}, Path(run_dir) / "before_kill.pt")
    _learn(actor, clipo, cfg, 4)

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    save._write_atomically = killed  # fault injection: the first atomic write of the save's last part
    save.save_checkpoint(run_dir, 4, actor, clipo, {"step": 4}, keep_last=2)


def _restart_rank(rank, world, cfg, run_dir):
    from clipo_nemo.parallel.state import destroy_parallel_state
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.checkpoint.recovery import checkpoints_dir, latest_checkpoint
    from clipo_nemo.checkpoint.save import save_checkpoint

    try:
        root = checkpoints_dir(run_dir)
        after_kill = sorted(p.name for p in root.iterdir())
        latest = latest_checkpoint(run_dir).name
        actor, clipo = _build(cfg)
        _zero_all(actor, clipo)
        state = load_checkpoint(run_dir, actor, clipo)
        loaded = _snapshot(actor, clipo, cfg)
        save_checkpoint(run_dir, 4, actor, clipo, {"step": 4}, keep_last=2)
        return {"after_kill": after_kill, "latest": latest, "state": state, "loaded": loaded,
                "after_resave": sorted(p.name for p in root.iterdir())}
    finally:
        destroy_parallel_state()


def test_keep_last_and_sigkill_mid_save(tmp_path):
    cfg = _cfg()
    with pytest.raises(DistributedRunError, match="exit code -9"):
        run_distributed(_saves_then_killed_rank, 1, args=(cfg, str(tmp_path)), timeout_s=TIMEOUT_S)
    before = torch.load(tmp_path / "before_kill.pt", weights_only=False)
    # reference/: the frozen reference policy, written once by the first save (random init: no init_from).
    assert before["listings"] == [["latest", "reference", "step_1"], ["latest", "reference", "step_1", "step_2"],
                                  ["latest", "reference", "step_2", "step_3"]]

    after = run_distributed(_restart_rank, 1, args=(cfg, str(tmp_path)), timeout_s=TIMEOUT_S)[0]
    # The killed save left a partial .tmp dir (weights, no meta.json); latest still names step 3.
    assert after["after_kill"] == [".tmp-step_4", "latest", "reference", "step_2", "step_3"]
    assert after["latest"] == "step_3" and after["state"] == {"step": 3}
    _assert_weights_and_moments(before["step3"], after["loaded"], exact_logprobs=True)
    # The next save cleans the leftover and keeps the last two.
    assert after["after_resave"] == ["latest", "reference", "step_3", "step_4"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_4"


def test_no_checkpoint_and_bad_arguments(tmp_path):
    from clipo_nemo.checkpoint.recovery import latest_checkpoint
    from clipo_nemo.checkpoint.save import save_checkpoint

    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, None, None, {}, keep_last=0)
    with pytest.raises(TypeError, match="trainer_state"):
        save_checkpoint(tmp_path, 1, None, None, [1], keep_last=1)
    assert not (tmp_path / "checkpoints").exists()


# --- helper processes die with a killed trainer -----------------------------------------------------
def _killed_while_writing_rank(rank, world, cfg, run_dir):
    """Save step 1, start an asynchronous save of step 2 whose file writers stall, then SIGKILL this
    rank while they write; record the writer processes' pids first."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from clipo_nemo.checkpoint.save import save_checkpoint

    actor, clipo = _build(cfg)
    save_checkpoint(run_dir, 1, actor, clipo, {"step": 1}, keep_last=2)
    pids = Path(run_dir) / "writer_pids"
    pids.mkdir()

    def stalled_write(*args, **kwargs):  # runs in megatron's per-file writer, a child of the writer process
        (pids / f"{os.getppid()}_{os.getpid()}").touch()
        time.sleep(600)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(stalled_write)
    save_checkpoint(run_dir, 2, actor, clipo, {"step": 2}, keep_last=2, asynchronous=True)
    deadline = time.time() + 60
    while not any(pids.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_writer_processes_die_with_a_killed_trainer(tmp_path):
    with pytest.raises(DistributedRunError, match="exit code -9"):
        run_distributed(_killed_while_writing_rank, 1, args=(_cfg(), str(tmp_path)), timeout_s=TIMEOUT_S)
    pids = {int(pid) for f in (tmp_path / "writer_pids").iterdir() for pid in f.name.split("_")}
    assert len(pids) >= 2  # the writer process and at least one per-file writer it forked
    deadline = time.time() + 10
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)]
    from clipo_nemo.checkpoint.recovery import latest_checkpoint

    assert latest_checkpoint(tmp_path).name == "step_1"  # the killed save was never published
    assert not (tmp_path / "checkpoints" / ".tmp-step_2" / "meta.json").exists()
