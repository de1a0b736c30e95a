"""The training loop of torchvision_train.py under DistributedDataParallel: full-rank, then Facto.

What it shows, beyond the single-process loop:

- compile the plain model, not the DDP wrapper (`facto_fx.compile(model, ...)`), then wrap the Facto
  model in a new `DistributedDataParallel`; `facto_fx.attach` goes on the Facto model itself;
- every rank merges on the same step (the same `merge_every`, and a `DistributedSampler` gives every
  rank the same number of batches) and draws the same D (seeded per layer and draw), so W, M and D stay
  identical without being broadcast;
- batch-norm running statistics, which each rank updates on its own batches, are averaged over the
  ranks after calibration and after every epoch, so all ranks evaluate and export the same model.

    torchrun --nproc-per-node 2 examples/ddp_train.py           # one process per GPU (nccl), or CPUs (gloo)
    python examples/ddp_train.py --smoke                        # starts 2 CPU processes itself; seconds

Not launched by torchrun, the script starts `--nproc-per-node` CPU processes itself
(torch.multiprocessing.spawn, gloo, a free local port).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision_train import WEIGHT_DECAY, autocast, facto_optimizer  # the single-process loop's pieces

import facto_fx
from facto_fx.training.data import load_splits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="any torchvision classification model")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--frt-epochs", type=int, default=3, help="full-rank epochs before Facto")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.05, help="full-rank rate; Facto starts at a tenth of it")
    parser.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="processes to start without torchrun")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (--smoke: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the dense model (default ./facto-ddp)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes; also saves each rank's final state_dict (rank<r>.pt) to compare them")
    args = parser.parse_args(argv)
    if args.smoke:  # one full-rank epoch, one Facto epoch of 3 steps per rank, ending in a merge
        args.epochs, args.frt_epochs, args.batch_size, args.threads = 2, 1, 16, args.threads or 1
    if not 0 < args.frt_epochs < args.epochs:
        parser.error("--frt-epochs must be at least 1 and less than --epochs (Facto starts from a trained model)")
    return args


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned(rank: int, args: argparse.Namespace, world_size: int, port: int) -> None:
    """Entry point of a process started by main() without torchrun: the environment torchrun would set."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    train(args, torch.device("cpu"))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_batch_norm_statistics(model: nn.Module) -> None:
    """Each rank's running statistics replaced by their mean over the ranks (as timm's distribute_bn):
    the same on every rank, so evaluation and export do not depend on which rank runs them."""
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, device: torch.device,
                amp: bool) -> float:
    """One epoch of this rank's shard; the loss averaged over all ranks."""
    model.train()
    total, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()  # DDP averages the gradients over the ranks here
        opt.step()  # attach's hooks run after it: the same merge on every rank
        total, seen = total + loss.item() * len(y), seen + len(y)
    total, seen = all_sum([total, seen], device)
    return total / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> float:
    """Accuracy over every rank's shard of the test set (the plain model: no DDP needed to evaluate)."""
    model.eval()
    correct = seen = 0
    for x, y in loader:
        with autocast(device, amp):
            correct += (model(x.to(device, memory_format=torch.channels_last)).argmax(1).cpu() == y).sum().item()
        seen += len(y)
    correct, seen = all_sum([correct, seen], device)
    return correct / seen


def train(args: argparse.Namespace, device: torch.device) -> dict:
    """One rank's run, in the process group the environment describes (torchrun's variables)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        return run_rank(args, device, rank, world_size)
    finally:
        dist.destroy_process_group()


def run_rank(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> dict:
    """Full-rank epochs, the switch to Facto, Facto epochs; rank 0 writes the dense model and result.json."""
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    splits = load_splits("digits", image_size=32)
    train_set, test_set = splits.train, splits.test
    if args.smoke:
        train_set, test_set = Subset(train_set, range(3 * args.batch_size * world_size)), Subset(test_set, range(64))
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world_size)), batch_size=256)
    device_ids = [device.index] if device.type == "cuda" else None
    amp = not args.no_amp

    model = torchvision.models.get_model(args.model, num_classes=splits.num_classes)
    model = model.to(device, memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    losses: list[float] = []
    for epoch in range(args.frt_epochs):
        sampler.set_epoch(epoch)
        losses.append(train_epoch(ddp, train_loader, opt, device, amp))
        if rank == 0:
            print(f"epoch {epoch + 1} full-rank: loss {losses[-1]:.4f}")

    # The switch: drop the full-rank wrapper, compile the plain model (the Facto model shares its
    # weights), agree on the statistics, and wrap the Facto model anew. Its buffers are still broadcast
    # from rank 0 at each forward (DDP's default), as facto-fx train does for batch statistics.
    del ddp
    lr = args.lr * 0.1
    calibration = [x.to(device, memory_format=torch.channels_last) for x, _ in itertools.islice(train_loader, 4)]
    fmodel = facto_fx.compile(model, calibration_data=calibration, example_inputs=calibration[0][:2])
    average_batch_norm_statistics(fmodel)
    opt = facto_optimizer(fmodel, lr)
    hooks = facto_fx.attach(fmodel, opt, merge_every=len(train_loader), w_decay=lr * WEIGHT_DECAY)
    ddp = DistributedDataParallel(fmodel, device_ids=device_ids)
    for epoch in range(args.frt_epochs, args.epochs):
        sampler.set_epoch(epoch)
        losses.append(train_epoch(ddp, train_loader, opt, device, amp))
        average_batch_norm_statistics(fmodel)
        if rank == 0:
            print(f"epoch {epoch + 1} facto: loss {losses[-1]:.4f} ({hooks.merges} merges)")
    accuracy = evaluate(fmodel, test_loader, device, amp)

    out = args.out
    result = {"losses": losses, "test_accuracy": accuracy, "merges": hooks.merges, "world_size": world_size,
              "dense_path": str(out / f"{args.model}_dense.pt"), "rank_states": []}
    if args.smoke:  # for a test: every rank's W, M, D, statistics, to check they are identical
        torch.save(fmodel.state_dict(), out / f"rank{rank}.pt")
        result["rank_states"] = [str(out / f"rank{r}.pt") for r in range(world_size)]
    if rank == 0:  # one process writes the files
        print(f"test accuracy {accuracy:.3f}")
        torch.save(facto_fx.export_dense(fmodel).state_dict(), result["dense_path"])
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(f"dense model: {result['dense_path']}")
    dist.barrier()  # the files are written before any rank (or the parent) reads them
    return result


def main(argv: list[str] | None = None) -> dict:
    """Under torchrun, run this rank; otherwise start --nproc-per-node CPU processes and return rank 0's result."""
    args = parse_args(argv)
    if launched_by_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        args.out = args.out or Path("facto-ddp")
        args.out.mkdir(parents=True, exist_ok=True)
        return train(args, device)
    # Every process must write to the same folder: choose it here, before they start.
    args.out = args.out or (Path(tempfile.mkdtemp(prefix="facto-ddp-")) if args.smoke else Path("facto-ddp"))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"not launched by torchrun: starting {args.nproc_per_node} CPU processes (gloo)")
    mp.spawn(spawned, args=(args, args.nproc_per_node, free_port()), nprocs=args.nproc_per_node, join=True)
    return json.loads((args.out / "result.json").read_text())


if __name__ == "__main__":
    main()
