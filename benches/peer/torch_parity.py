"""PyTorch side of the training-curve parity check (run with the peer venv).

Builds the reference GPT of ../shared/peer/gpt_model.py, writes its initial weights and a few
batches as safetensors, trains K steps with torch AdamW (fp32, no clipping, 2 threads) and
writes the losses as JSON. `cargo run --release --example torch_parity -- DIR` then trains the
workspace's GPT from the same weights on the same batches and compares.

Usage: python benches/peer/torch_parity.py DIR [--steps 5] [--layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --batch 8]
"""
import argparse, json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "..", "shared", "peer"))
import torch
from safetensors.torch import save_file
from gpt_model import GPT

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--hidden", type=int, default=256)
ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--vocab", type=int, default=8192)
ap.add_argument("--batch", type=int, default=8)
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
torch.set_num_threads(2)
torch.manual_seed(0)
m = GPT(a.vocab, a.hidden, a.heads, a.layers, a.seq)
state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items() if k != "head.weight"}
save_file(state, os.path.join(a.dir, "init.safetensors"))
g = torch.Generator().manual_seed(1)
batches = {}
for s in range(a.steps):
    batches[f"x{s}"] = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    batches[f"y{s}"] = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
save_file(batches, os.path.join(a.dir, "batches.safetensors"))
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
losses = []
for s in range(a.steps):
    loss = m(batches[f"x{s}"], batches[f"y{s}"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
json.dump({"losses": losses, "shape": vars(a)}, open(os.path.join(a.dir, "torch.json"), "w"))
print("torch losses:", losses)
