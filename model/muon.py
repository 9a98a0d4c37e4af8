"""Muon, batched: `torch.optim.Muon`'s update, with every matrix of one shape orthogonalised together.

torch.optim.Muon runs Newton-Schulz one matrix at a time, some twenty small kernels each: on a GPU a model of
a few dozen matrices spends its optimizer step launching kernels, and under DDP every process orthogonalises
every matrix. Here the matrices of one shape (a model has a handful of shapes) are stacked and go through one
batched iteration (compiled on CUDA), and under torchrun each process orthogonalises its share of every stack
and all-gathers the rest, as nanochat and modded-nanogpt do. The state (`momentum_buffer` per parameter) and
the hyperparameters are torch.optim.Muon's, so a resume state of either loads into the other. Like fused
AdamW it follows GradScaler's protocol (`found_inf`, `grad_scale`): a step whose `found_inf` is non-zero leaves
the weights and the momentum as they were, decided on the device without the host reading it.
"""

import warnings

import torch
import torch.distributed as dist
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr


QUINTIC = (DEFAULT_A, DEFAULT_B, DEFAULT_C)  # torch.optim.Muon's one quintic for every step
# Polar Express (arXiv 2505.16932): a quintic of its own for each of five steps, chosen so the singular values
# reach 1 in fewer steps than with one fixed quintic (the paper's coefficients for 5 steps, safety factor 2e-2,
# cushion 2). The input's norm gets the paper's 1% margin.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def newton_schulz(stack, coefficients, steps, eps, dtype=torch.bfloat16):
    """The orthogonalised [n, rows, cols] matrices, in `dtype`: torch.optim.Muon's quintic iteration (which runs in
    bfloat16), batched. `coefficients` is one (a, b, c) for every step, as torch.optim.Muon's, or one per step
    (POLAR_EXPRESS; past the last, the last repeats)."""
    if isinstance(coefficients[0], (tuple, list)):
        schedule = [*coefficients[:steps], *[coefficients[-1]] * (steps - len(coefficients))]
        margin = 1.01
    else:
        schedule, margin = [coefficients] * steps, 1.0
    x = stack.to(dtype)
    tall = stack.size(1) > stack.size(2)
    if tall:
        x = x.transpose(1, 2)
    x = x / (x.norm(dim=(1, 2), keepdim=True) * margin).clamp(min=eps)
    for a, b, c in schedule:
        gram = x @ x.transpose(1, 2)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.transpose(1, 2) if tall else x


def is_hidden_matrix(name, parameter):
    """A weight matrix inside a decoder block (attention, feed-forward, experts, their LoRA adapters), not the
    embedding, the head or a router: what Muon orthogonalises."""
    return parameter.dim() == 2 and ".layers." in name and not name.endswith("mlp.gate.weight")


class BatchedMuon(torch.optim.Optimizer):
    _step_supports_amp_scaling = True  # reads `found_inf` and `grad_scale` (GradScaler sets them for a step)

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=QUINTIC, eps=EPS, ns_steps=DEFAULT_NS_STEPS,
                 adjust_lr_fn=None, row_beta2=0.0, compile=False, ns_dtype=None):
        """`row_beta2`: above 0, NorMuon (arXiv 2510.05491, as its authors' code): each row of the orthogonalised
        update (one output neuron) is divided by the root of a running mean of its squares, decaying by `row_beta2`,
        and the update then rescaled to its norm before; the running means are the state's
        `second_momentum_buffer` ([rows, 1] per parameter). `compile`: orthogonalise through torch.compile on CUDA
        (one fused graph per stack shape); a compile that fails warns once and the iteration runs eagerly.
        `ns_dtype`: the dtype Newton-Schulz runs in; by default bfloat16 on a GPU, as torch.optim.Muon, and float32
        on a CPU, where bfloat16 matmuls without native bfloat16 arithmetic (AVX2) are far slower: a whole training
        step of configs/tiny.json with Newton-Schulz in bfloat16 measured 1.76x AdamW's, in float32 1.02x
        (scripts/bench.py --cases muon)."""
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn,
                    "row_beta2": row_beta2}
        super().__init__(params, defaults)
        if any(p.ndim != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon orthogonalises matrices: every parameter must be 2-D")
        self.compile, self.ns_dtype = compile, ns_dtype
        self.orthogonalise = newton_schulz

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            stacks = {}
            for p in group["params"]:
                if p.grad is not None:
                    stacks.setdefault((p.shape, p.dtype, p.device), []).append(p)
            for (shape, _, device), params in stacks.items():
                if self.compile and device.type == "cuda" and self.orthogonalise is newton_schulz:
                    self.orthogonalise = torch.compile(newton_schulz)
                self.update(group, params, shape)

    def update(self, group, params, shape):
        """One stack of same-shape parameters: momentum, orthogonalisation (shared out under torchrun), step."""
        momentum, lr = group["momentum"], group["lr"]
        grads = [p.grad for p in params]
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        decay, step_size = 1 - lr * group["weight_decay"], -_adjust_lr(lr, group["adjust_lr_fn"], shape)
        if getattr(self, "grad_scale", None) is not None:  # gradients GradScaler has not unscaled
            grads = torch._foreach_div(grads, self.grad_scale)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:  # a skipped step: the momentum as gradient (it stays as it was), no decay, no step
            keep = found_inf == 0
            grads = list(torch.where(keep, torch.stack(grads), torch.stack(buffers)).unbind(0))
            decay = torch.where(keep, decay, 1.0)
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
        orthogonal = self.orthogonalised(torch.stack(updates), group)
        if group.get("row_beta2", 0.0) > 0:  # NorMuon
            normalised = self.rows_normalised(orthogonal.float(), params, group["row_beta2"], found_inf)
            orthogonal = normalised.to(orthogonal.dtype)
        if found_inf is not None:  # times 1 or 0: exact, and the step size stays a float32 scalar of the add
            orthogonal = orthogonal * keep.to(orthogonal.dtype)
        torch._foreach_mul_(params, decay)
        torch._foreach_add_(params, list(orthogonal.unbind(0)), alpha=step_size)

    def rows_normalised(self, orthogonal, params, beta2, found_inf):
        """NorMuon's step on a stack of orthogonalised updates [n, rows, cols] in float32: every row divided by the
        root of its running mean square, the whole update then rescaled to its norm before. A skipped step
        (`found_inf`) leaves the running means as they were."""
        for p in params:
            if "second_momentum_buffer" not in self.state[p]:
                self.state[p]["second_momentum_buffer"] = orthogonal.new_zeros(p.shape[0], 1)
        buffers = torch.stack([self.state[p]["second_momentum_buffer"] for p in params])
        row_mean_square = orthogonal.square().mean(dim=2, keepdim=True)
        if found_inf is not None:
            row_mean_square = torch.where(found_inf == 0, row_mean_square, buffers)
        buffers.lerp_(row_mean_square, 1 - beta2)
        for p, buffer in zip(params, buffers.unbind(0)):
            self.state[p]["second_momentum_buffer"].copy_(buffer)
        normalised = orthogonal * buffers.clamp(min=1e-20).rsqrt()
        norm = orthogonal.norm(dim=(1, 2), keepdim=True)
        return normalised * (norm / normalised.norm(dim=(1, 2), keepdim=True).clamp(min=1e-10))

    def orthogonalised(self, stack, group):
        """Newton-Schulz over the stack; under torchrun each process takes an equal slice (the stack padded with
        zero matrices, which stay zero) and gathers the others' results."""
        dtype = self.ns_dtype or (torch.bfloat16 if stack.is_cuda else torch.float32)
        arguments = (group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
        processes = dist.get_world_size() if dist.is_initialized() else 1
        if processes == 1:
            return self.newton_schulz(stack, arguments)
        share = -(-len(stack) // processes)
        padded = torch.cat([stack, stack.new_zeros(share * processes - len(stack), *stack.shape[1:])])
        mine = self.newton_schulz(padded[dist.get_rank() * share:(dist.get_rank() + 1) * share], arguments)
        gathered = mine.new_empty(share * processes, *mine.shape[1:])
        dist.all_gather_into_tensor(gathered, mine.contiguous())
        return gathered[:len(stack)]

    def newton_schulz(self, stack, arguments):
        try:
            return self.orthogonalise(stack, *arguments)
        except torch._dynamo.exc.TorchDynamoException as err:
            warnings.warn(f"torch.compile of Muon's Newton-Schulz failed ({type(err).__name__}); it runs eagerly")
            self.orthogonalise, self.compile = newton_schulz, False
            return newton_schulz(stack, *arguments)
