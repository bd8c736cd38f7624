"""The data-parallel world from torchrun's environment, and each rank's share of a loader."""

from __future__ import annotations

import pytest
import torch

from spiralkit.data import TensorLoader
from spiralkit.errors import SpiralError
from spiralkit.parallel import SINGLE, World, world_from_env


def test_without_torchrun_the_world_is_one_process() -> None:
    assert world_from_env({}) is SINGLE
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is SINGLE
    assert SINGLE.main and not SINGLE.parallel and str(SINGLE) == "1 process"


def test_torchrun_variables_make_the_world() -> None:
    world = world_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert world == World(size=4, rank=2, local_rank=0, backend="gloo")
    assert not world.main and world.parallel and str(world) == "4 processes (gloo)"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "environment variable WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "WORLD_SIZE=2, RANK=2, LOCAL_RANK=0"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "torchrun environment is inconsistent"),
    ],
)
def test_a_bad_torchrun_environment_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SpiralError, match=message):
        world_from_env(env)


def _loader(n: int = 20, batch_size: int = 4) -> TensorLoader:
    return TensorLoader(torch.arange(n).float().unsqueeze(1), torch.arange(n), batch_size=batch_size, shuffle=True, seed=7)


def test_the_ranks_shares_of_each_batch_make_the_single_process_batch() -> None:
    """Global batch = per-rank batch × processes: together the ranks take the steps one process takes."""
    whole = _loader()
    shares = [World(size=2, rank=rank, backend="gloo").shard(whole) for rank in range(2)]
    assert [s.batch_size for s in shares] == [2, 2] and len(shares[0]) == len(whole) == 5
    for epoch in (0, 3):
        whole.set_epoch(epoch)
        for share in shares:
            share.set_epoch(epoch)
        for batch, *parts in zip(whole, *shares, strict=True):
            assert sorted(torch.cat([y for _, y in parts]).tolist()) == sorted(batch[1].tolist())


def test_a_global_batch_that_does_not_split_evenly_is_named() -> None:
    with pytest.raises(SpiralError, match="data.batch_size 4 is the global batch and must be a multiple of the 3 processes"):
        World(size=3, rank=0, backend="gloo").shard(_loader())


def test_a_loader_that_cannot_be_sharded_is_named() -> None:
    with pytest.raises(SpiralError, match="needs a loader that can be sharded .* list cannot"):
        World(size=2, rank=0, backend="gloo").shard([(torch.zeros(2), torch.zeros(2))])


def test_one_process_passes_everything_through() -> None:
    loader = _loader()
    assert SINGLE.shard(loader) is loader
    assert SINGLE.broadcast({"a": 1}) == {"a": 1} and SINGLE.gather(3) == [3]
    SINGLE.check_same("anything", object())
    param = torch.nn.Parameter(torch.ones(3))
    (param * 2).sum().backward()
    assert SINGLE.average_gradients([param], torch.tensor(0.5)) == 0.5 and torch.equal(param.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("command", ["compare", "analyze"])
def test_commands_that_run_in_one_process_refuse_torchrun(command: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from spiralkit.cli import app  # noqa: PLC0415

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = [command, str(tmp_path / "r.yaml")] + (["--out", str(tmp_path / "out")] if command == "analyze" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"spiral {command} runs in one process: launch it without torchrun" in " ".join(result.output.split())


def _two_ranks(rank: int, store: str, out: str) -> None:
    """One of two gloo ranks: average gradients, broadcast, and disagree on purpose."""
    import json  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = World(size=2, rank=rank, backend="gloo")
    try:
        param = torch.nn.Parameter(torch.zeros(2))
        param.grad = torch.full((2,), float(rank + 1))  # 1 on rank 0, 2 on rank 1
        loss = world.average_gradients([param], torch.tensor(float(10 * rank)))
        weights = torch.full((3,), float(rank))
        world.sync([weights])
        result = {"grad": param.grad.tolist(), "loss": loss, "synced": weights.tolist(),
                  "broadcast": world.broadcast(f"from rank {rank}")}
        try:
            world.check_same("the model's parameter shapes", [rank])
        except SpiralError as exc:
            result["error"] = str(exc)
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w", encoding="utf-8") as handle:
        json.dump(result, handle)


@pytest.mark.slow
def test_two_gloo_ranks_average_agree_and_name_a_disagreement(tmp_path) -> None:
    import json  # noqa: PLC0415

    import torch.multiprocessing as mp  # noqa: PLC0415

    mp.spawn(_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert result["grad"] == [1.5, 1.5] and result["loss"] == 5.0  # the mean over the ranks
        assert result["synced"] == [0.0, 0.0, 0.0] and result["broadcast"] == "from rank 0"
        assert result["error"].startswith("data-parallel ranks disagree on the model's parameter shapes: "
                                          "rank 1 differs from rank 0")
