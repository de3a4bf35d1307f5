"""SFT with the trainer layer on several processes, DDP or FSDP2:

    torchrun --nproc-per-node 2 examples/train_distributed.py            # DDP
    torchrun --nproc-per-node 2 examples/train_distributed.py --fsdp2    # FSDP2 (fully_shard)

CPUs (gloo) or one GPU per process (nccl). ``batch_size`` is the global batch: the Trainer splits
each batch over the ranks, sums the token counts over them and logs the whole batch's metrics, so
the run equals one process on the same batches (tests/test_distributed.py checks it). Replace the
tiny model and the toy task by your own ``AutoModelForCausalLM`` and records.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from posttrain_kernels.pipeline.task import DEFAULT_TASK
from posttrain_kernels.pipeline.tiny_models import build_policy
from posttrain_kernels.pipeline.tokenizer import default_tokenizer
from posttrain_kernels.trainer import SFT, TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdp2", action="store_true", help="shard with fully_shard instead of DDP")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")

    tok = default_tokenizer()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_policy(tok, hidden_size=64, num_hidden_layers=2, intermediate_size=128).to(device)
    if args.fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # the head weight is sharded too: the losses gather it inside the forward
    else:
        model = DDP(model)

    records = DEFAULT_TASK.sft_examples(256, seed=0)
    config = TrainConfig(steps=args.steps, batch_size=8, lr=2e-3, log_every=max(1, args.steps // 4),
                         progress=rank == 0)
    history = Trainer(model, SFT(records, tok), config).train()
    if rank == 0:
        print(f"final loss {history[-1]['loss']:.4f} after {len(history)} steps on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
