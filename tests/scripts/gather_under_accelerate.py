"""Run by tests/test_accelerate_configs.py under `accelerate launch --num_processes 2`: each rank gathers its
rows with gradients and rank 0 prints the gathered rows and the gradient it received as JSON."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator

from hf_ext.distributed import all_gather_with_grad

state = Accelerator()
rows = state.process_index + 2  # unequal: rank 0 holds 2 rows, rank 1 holds 3
x = torch.full((rows, 2), float(state.process_index), requires_grad=True)
gathered = all_gather_with_grad(x)
(gathered.sum(dim=1) * torch.arange(1.0, gathered.shape[0] + 1)).sum().backward()
payload = {
    "rank": state.process_index,
    "world": state.num_processes,
    "gathered": gathered.tolist(),
    "grad": x.grad.tolist(),
}
print("RESULT " + json.dumps(payload), flush=True)
# Without this, gloo's threads can abort the process at exit ("terminate called without an active exception").
state.end_training()
