"""Checkpoint work spread over ranks (issue 20): per-rank checksums and split verification, sliced
init_from reads, the reference identified without hashing, the distributed-optimizer format's layout
guard, old formats still loading, and the planner's checkpoint cost.

Oracles: zlib's CRC-32 of the files, the full tensors of a safetensors file (``safetensors.torch.load_file``),
``/proc/self/io`` after evicting a file from the page cache, the scale review's independent arithmetic
for llama3_70b (docs/reviews/scale.md: 70.55 B parameters, a 987.9 GB checkpoint, 13.2 GB of
optimizer shard and 105.9 GB of whole-TP-shard optimizer state per rank).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from clipo_nemo.checkpoint.recovery import checked_by, verify_checkpoint
from clipo_nemo.parallel.launcher import run_distributed
from benchmarks.checkpoint_scaling import evict_from_page_cache
from tests.test_checkpoint import TIMEOUT_S, _build, _cfg, _learn

ROOT = Path(__file__).resolve().parents[1]


def _crc(path: Path) -> str:
    return f"{zlib.crc32(path.read_bytes()):08x}"


# --------------------------------------------------------------------------------------------------
# Per-rank checksums, verification split over ranks
# --------------------------------------------------------------------------------------------------
def _save_then_verify_rank(rank, world, cfg, run_dir):
    import torch.distributed as dist

    from clipo_nemo.checkpoint.save import save_checkpoint
    from clipo_nemo.checkpoint.shared_verify import verify_together
    from clipo_nemo.parallel.state import destroy_parallel_state

    try:
        actor, clipo = _build(cfg)
        _learn(actor, clipo, cfg, step=1)
        final = save_checkpoint(run_dir, 1, actor, clipo, {"step": 1}, keep_last=2)
        whole = verify_together(final)
        dist.barrier()
        if rank == 0:  # damage one shard file that rank 1 wrote (and checksummed)
            files = json.loads((final / "manifest.json").read_text())["files"]
            name = next(n for n, e in sorted(files.items()) if e["rank"] == 1 and n.endswith(".distcp"))
            data = bytearray((final / name).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (final / name).write_bytes(bytes(data))
        dist.barrier()
        own = verify_checkpoint(final, share=(rank, world))
        return {"whole": whole, "own": own, "agreed": verify_together(final)}
    finally:
        destroy_parallel_state()


def test_each_rank_checksums_what_it_wrote_and_verifies_its_share(tmp_path):
    ranks = run_distributed(_save_then_verify_rank, 2, args=(_cfg(), str(tmp_path)), timeout_s=TIMEOUT_S)
    final = tmp_path / "checkpoints" / "step_1"
    files = json.loads((final / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()
                     and p.name not in ("manifest.json", "meta.json"))
    assert sorted(files) == on_disk  # every file, and no per-rank checksum record left behind
    shards = {n: e for n, e in files.items() if n.endswith(".distcp")}
    assert {e["rank"] for e in shards.values()} == {0, 1}  # both ranks' writers wrote and checksummed
    assert all(e["rank"] == int(Path(n).name.split("_")[2]) for n, e in shards.items())  # __<rank>_<i>.distcp
    assert files["rng/rank_00001.pt"]["rank"] == 1 and files["trainer_state.pt"]["rank"] == 0
    damaged = next(n for n, e in sorted(shards.items()) if e["rank"] == 1)
    for name, entry in files.items():
        if name != damaged:
            assert entry["crc32"] == _crc(final / name) and entry["size"] == (final / name).stat().st_size, name
    assert ranks[0]["whole"] is None and ranks[1]["whole"] is None
    assert ranks[0]["own"] is None  # rank 0 did not read rank 1's file ...
    assert "does not match its checksum" in ranks[1]["own"] and damaged in ranks[1]["own"]
    assert ranks[0]["agreed"] == ranks[1]["agreed"] == ranks[1]["own"]  # ... and both ranks take rank 1's verdict
    assert "does not match its checksum" in verify_checkpoint(final)  # the single-process check agrees


def test_verification_shares_cover_every_file_once():
    files = {f"f{i}": {"size": size, "crc32": "0", "rank": i % 3} for i, size in enumerate([50, 40, 30, 20, 10, 5])}
    assert checked_by(files, 3, 3) == {name: entry["rank"] for name, entry in files.items()}  # same world: writers
    other = checked_by(files, 2, 3)  # another world size: balanced by size
    assert sorted(other) == sorted(files) and set(other.values()) == {0, 1}
    loads = [sum(files[n]["size"] for n, r in other.items() if r == rank) for rank in (0, 1)]
    assert max(loads) - min(loads) <= 50
    assert set(checked_by({k: {"size": 1, "crc32": "0"} for k in files}, 3, 3).values()) == {0, 1, 2}  # no ranks


# --------------------------------------------------------------------------------------------------
# init_from: sliced reads
# --------------------------------------------------------------------------------------------------
def _read_bytes() -> int:
    with open("/proc/self/io") as handle:
        return next(int(line.split(":")[1]) for line in handle if line.startswith("read_bytes"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_reads_return_exactly_the_ranges(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from clipo_nemo.conversion.sliced_read import SafetensorsFile
    from clipo_nemo.models.sharding import tp_ranges

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(12, 10).to(dtype), "b": torch.randn(6).to(dtype), "empty": torch.zeros(0, 4)}, path)
    full, reader = load_file(path), SafetensorsFile(path)
    assert reader.shape_of("a") == (12, 10)
    assert torch.equal(reader.read_ranges("a", 0, [(3, 6)]), full["a"][3:6])
    assert torch.equal(reader.read_ranges("a", 1, [(2, 7)]), full["a"][:, 2:7])
    gated = reader.read_ranges("a", 0, tp_ranges(12, True, 1, 2))  # TP rank 1 of 2: rows 3:6 and 9:12
    assert torch.equal(gated, torch.cat([full["a"][3:6], full["a"][9:12]]))
    assert torch.equal(reader.read_ranges("b", 0, [(0, 6)]), full["b"])
    assert reader.read_ranges("a", 0, []).shape == (0, 10)
    assert reader.read_ranges("empty", 0, [(0, 0)]).shape == (0, 4)


def test_a_slice_reads_its_pages_only(tmp_path):
    from safetensors.torch import save_file

    from clipo_nemo.conversion.sliced_read import SafetensorsFile

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(512, 8192)}, path)  # 16 MiB, rows of 32 KiB (8 pages)
    evict_from_page_cache(tmp_path)
    before = _read_bytes()
    path.read_bytes()
    if _read_bytes() - before < path.stat().st_size // 2:
        pytest.skip("this file system does not let the page cache be evicted (tmpfs?)")
    size = path.stat().st_size
    # half the rows: half the pages; half of every row's columns: 4 or 5 of its 8 pages (a range not
    # aligned to pages touches one more)
    for dim, ranges, most in ((0, [(0, 256)], 0.55), (1, [(4096, 8192)], 0.65)):
        evict_from_page_cache(tmp_path)
        before = _read_bytes()
        SafetensorsFile(path).read_ranges("w", dim, ranges)
        assert (_read_bytes() - before) / size <= most, (dim, (_read_bytes() - before) / size)


# --------------------------------------------------------------------------------------------------
# Reference identity without hashing
# --------------------------------------------------------------------------------------------------
def test_reference_is_hashed_only_when_its_files_look_changed(tmp_path):
    from clipo_nemo.checkpoint.reference import directory_sha256, file_identities, identity_problem

    (tmp_path / "weights").mkdir()
    target = tmp_path / "weights" / "model.safetensors"
    target.write_bytes(b"x" * 1000)
    pointer = {"kind": "weights", "path": str(tmp_path), "sha256": directory_sha256(tmp_path),
               "files": file_identities(tmp_path)}
    calls = []

    def counting(path):
        calls.append(path)
        return directory_sha256(path)

    assert identity_problem(pointer, counting) is None and calls == []  # unchanged: stat only
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: hashed, accepted
    assert identity_problem(pointer, counting) is None and len(calls) == 1
    target.write_bytes(b"y" * 1000)  # changed bytes: hashed, refused
    assert "recorded" in identity_problem(pointer, counting) and len(calls) == 2
    old_pointer = {k: v for k, v in pointer.items() if k != "files"}  # format 2: hashed every time
    assert identity_problem(old_pointer, counting) is not None and len(calls) == 3


# --------------------------------------------------------------------------------------------------
# Distributed-optimizer format and old checkpoint formats
# --------------------------------------------------------------------------------------------------
def test_dp_reshardable_optimizer_state_refuses_another_tp_or_pp_only():
    from clipo_nemo.checkpoint.load import check_megatron_layout
    from clipo_nemo.checkpoint.recovery import CheckpointError

    saved = {"world_size": 8, "tp": 2, "pp": 1, "dp": 4}
    check_megatron_layout("dp_reshardable", saved, {"world_size": 4, "tp": 2, "pp": 1, "dp": 2}, Path("c"))  # DP
    check_megatron_layout("fully_reshardable", saved, {"world_size": 8, "tp": 4, "pp": 2, "dp": 1}, Path("c"))
    for now in ({"world_size": 8, "tp": 4, "pp": 1, "dp": 2}, {"world_size": 8, "tp": 2, "pp": 2, "dp": 2}):
        with pytest.raises(CheckpointError, match="trainer.reshardable_optimizer_checkpoints=true"):
            check_megatron_layout("dp_reshardable", saved, now, Path("c"))


def _save_rank(rank, world, cfg, run_dir):
    from clipo_nemo.checkpoint.save import save_checkpoint
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state

    try:
        actor, clipo = _build(cfg)
        _learn(actor, clipo, cfg, step=1)
        save_checkpoint(run_dir, 1, actor, clipo, {"step": 1}, keep_last=2)
        return gather_full_state_dict(actor.module, cfg.model.vocab_size)
    finally:
        destroy_parallel_state()


def _load_rank(rank, world, cfg, run_dir):
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state

    try:
        actor, clipo = _build(cfg)
        state = load_checkpoint(run_dir, actor, clipo)
        return state, gather_full_state_dict(actor.module, cfg.model.vocab_size)
    finally:
        destroy_parallel_state()


def test_a_format_2_checkpoint_still_loads(tmp_path):
    """Format 2 on disk (this version's layout for torch optimizers) without the fields format 3 adds:
    no per-file ``rank`` in the manifest, a reference pointer without ``files``."""
    saved = run_distributed(_save_rank, 2, args=(_cfg(), str(tmp_path)), timeout_s=TIMEOUT_S)[0]
    step = tmp_path / "checkpoints" / "step_1"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["format"] == 3 and meta["reference"]["files"]
    meta["format"] = 2
    meta["reference"].pop("files")
    (step / "meta.json").write_text(json.dumps(meta))
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"] = {name: {"size": e["size"], "crc32": e["crc32"]} for name, e in manifest["files"].items()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    state, loaded = run_distributed(_load_rank, 2, args=(_cfg(), str(tmp_path)), timeout_s=TIMEOUT_S)[1]
    assert state == {"step": 1}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


# --------------------------------------------------------------------------------------------------
# Planner: checkpoint cost and host RAM
# --------------------------------------------------------------------------------------------------
def test_checkpoint_cost_of_llama3_70b_matches_the_independent_count():
    from clipo_nemo.config import load_config
    from clipo_nemo.planner.host_memory import GB, check_host_memory, checkpoint_cost

    cfg = load_config(ROOT / "examples" / "conf" / "llama3_70b.yaml", [])
    cost = checkpoint_cost(cfg, 64)  # TP 8 x DP 8, 8 GPUs per node
    assert cost.sharding == "dp_reshardable"
    assert cost.checkpoint_bytes / GB == pytest.approx(987.9, rel=0.005)
    per_rank = (8.822e9 * 2 + 8.822e9 * 12) / 8 / GB  # weights and optimizer shard, each 1/DP of the TP shard
    assert cost.read_bytes_per_rank / GB == pytest.approx(per_rank, rel=0.005)
    assert cost.resume_host_bytes_per_node / GB == pytest.approx(8 * per_rank, rel=0.005)
    cfg.trainer.reshardable_optimizer_checkpoints = True
    full = checkpoint_cost(cfg, 64)
    assert full.resume_host_bytes_per_node / GB == pytest.approx(8 * (105.9 + 8.822e9 * 2 / 8 / GB), rel=0.005)
    # save: the 8 DP-rank-0 roots (one per TP rank) are all on node 0 and hold the whole optimizer state
    assert full.save_host_bytes_per_node / GB == pytest.approx(846.8 + 141.1 / 8, rel=0.005)
    cfg.trainer.node_ram_gib = 512
    with pytest.raises(ValueError, match="trainer.node_ram_gib=512"):
        check_host_memory(cfg, 64, on_gpu=True)
    cfg.trainer.reshardable_optimizer_checkpoints = False
    check_host_memory(cfg, 64, on_gpu=True)  # 124 GB per node fits


def test_a_conversion_records_its_hash_and_a_run_takes_it_without_hashing(tmp_path, monkeypatch):
    import hashlib

    from clipo_nemo.checkpoint import reference
    from clipo_nemo.conversion.weights import read_description
    from tests.test_conversion import _write, tiny_hf_model

    _write(tmp_path / "ckpt", tiny_hf_model("qwen2"))
    weights = tmp_path / "ckpt" / "weights"
    oracle = hashlib.sha256()
    for file in sorted(p for p in weights.rglob("*") if p.is_file()):
        oracle.update(str(file.relative_to(weights)).encode() + b"\0" + file.read_bytes())
    recorded = read_description(tmp_path / "ckpt")["weights_identity"]
    assert recorded["sha256"] == oracle.hexdigest()

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(reference, "directory_sha256", no_hashing)
    pointer = reference._identified_weights((tmp_path / "ckpt").resolve())  # what weights_pointer computes on rank 0
    assert pointer["sha256"] == oracle.hexdigest() and pointer["hashed"] == "weights"
    assert reference.identity_problem(pointer, no_hashing) is None
    shard = sorted(weights.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    monkeypatch.undo()
    assert "recorded" in reference.identity_problem(pointer)  # changed weights: hashed, refused
    assert "hashed" not in reference._identified_weights((tmp_path / "ckpt").resolve())  # no longer the record
