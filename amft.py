"""
Adaptive Meta Fine-Tuning (AMFT), as pure functions: tensors in, tensors out.

Paper: He, Feng, Li, "AMFT: Aligning LLM Reasoners by Meta-Learning the Optimal
Imitation-Exploration Balance", arXiv 2508.06944 (withdrawn). The spec this follows is
../shared/AMFT-SPEC.md; where the two differ, the spec stands.

One loss mixes imitation and exploration with a learned weight mu:
    L(theta; mu) = (1 - mu) * L_RL(theta) + mu * L_SFT(theta)
    L_SFT = - mean over demo tokens of log pi(y*_t | x, y*_<t)
    L_RL  = - sum_i,t min(rho A_i, clip(rho, 1-eps_low, 1+eps_high) A_i) / sum_i |y_i|
            (+ beta * KL_k3(pi || pi_ref)),  A_i = (r_i - mean r) / (std r + eps)
and mu is moved every step by two signals:
    g_H    = H_target - H_t                                     (entropy below target: mu up)
    g_meta = dU/dmu = -alpha <grad U(theta'), g_SFT - g_RL>     (every K steps)
             theta'(mu) = theta - alpha [(1 - mu) g_RL + mu g_SFT]
    mu <- clip(mu + eta_meta * g_meta / RMS(g_meta) + eta_H * g_H, mu_min, mu_max)
U is the expected verifiable reward on validation prompts, estimated with the policy-gradient
surrogate U_sur(phi) = mean_i A_i * mean_t log pi_phi(y_i,t) on rollouts sampled from pi_theta.

Where this departs from the paper (and the authors' code), and why:
1. Sign of the meta step. The authors' code adds the gradient of a validation *loss* to mu
   (gradient ascent on the loss). We ascend the validation *utility* U: dU/dmu > 0 moves mu up.
2. Scale of the meta step. The raw dU/dmu is proportional to alpha and tiny; we divide it by
   its running RMS (bias-corrected, like Adam's second moment), so eta_meta is in units of mu.
3. The look-ahead is one plain gradient step of size alpha (default: the learning rate), even
   though the real update is AdamW. Three estimators of dU/dmu are offered: first-order (the
   paper's: grad U at theta instead of theta'), autograd (exact for U_sur, through
   torch.func.functional_call) and central finite difference. The test suite checks they agree.
4. One policy update per batch of rollouts, so pi_old = pi_theta (detached) and rho = 1 at the
   update; the clip is kept so the loss is GRPO's, and binds when updates per batch > 1.
5. Target entropy H_target is measured once, on the policy's own samples at the end of the
   SFT warm-up (as the spec says), unless given as a flag.

The baselines share the same loop; `loss_weights` gives each method's update w_RL g_RL + w_SFT g_SFT:
  sft (0, 1); grpo, luffy and sft-grpo after its SFT stage (1, 0); fixed-mix and amft (1 - mu, mu);
  srft (1, 0.5 exp(-H)).  Choices of ours where the baselines' papers leave room:
6. SRFT (arXiv 2506.19767): H in w_SFT = 0.5 sg(exp(-H)) is the mean token entropy of this step's
   rollouts; "RL on demonstrations" puts the demonstration in the GRPO group as its (G+1)-th
   sample with the plain policy gradient (no ratio: it was not sampled from pi). SRFT's extra
   weighting of positive self-rollouts is not implemented.
7. LUFFY (arXiv 2504.14945): the demonstration is the group's (G+1)-th sample, advantages are
   computed over all G+1, and its tokens use the shaped objective f(p) = p / (p + 0.1), unclipped.
8. Warm-up: amft, its ablations, fixed-mix and sft-grpo (whose first stage it is) start with
   --warmup SFT-only steps; sft, grpo, srft and luffy start from the base model, as in their papers.
"""
import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, denom=None) -> torch.Tensor:
    """Mean of x where mask is 1. `denom` replaces the mask's count: with micro-batches, each
    chunk divides by the whole batch's token count, so the chunks' losses add up exactly."""
    if dim is None:
        return (x * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# ---------------------------------------------------------------------------- losses
def sft_loss(logp: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    """Negative log-likelihood averaged over all demonstration tokens of the batch."""
    return -masked_mean(logp, mask, denom=denom)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4):
    """rewards (B, G) -> advantages (B, G), fraction of groups with zero std.
    A group whose rewards are all equal gets A = 0 exactly: it carries no signal."""
    std = rewards.std(dim=1, keepdim=True)                          # (B, 1)
    zero = std < 1e-8
    A = torch.where(zero, torch.zeros_like(rewards), (rewards - rewards.mean(1, keepdim=True)) / (std + eps))
    return A, zero.float().mean().item()


def grpo_loss(logp, old_logp, A, mask, eps_low=0.2, eps_high=0.28, beta=0.0, ref_logp=None, denom=None):
    """Clipped GRPO/DAPO loss, token-level mean. logp, old_logp, ref_logp, mask: (N, T);
    A: (N,) one advantage per completion. Returns loss and a metrics dict."""
    ratio = torch.exp(logp - old_logp)                               # (N, T)
    A = A[:, None]                                                   # (N, 1)
    surrogate = torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    loss = -masked_mean(surrogate, mask, denom=denom)
    metrics = {"clip_frac": masked_mean((surrogate < ratio * A).float(), mask).item()}
    if beta > 0:
        # k3 estimator of KL(pi || ref), Schulman 2020: exp(ref - logp) - (ref - logp) - 1
        d = ref_logp - logp
        kl = masked_mean(torch.exp(d) - d - 1, mask, denom=denom)
        loss = loss + beta * kl
        metrics["kl"] = kl.item()
    return loss, metrics


def off_policy_loss(logp, A, mask, shaping: bool, gamma=0.1, denom=None):
    """RL on demonstrations (not sampled from pi, so no ratio to clip). LUFFY (arXiv 2504.14945)
    shapes the token probability, f(p) = p / (p + gamma), which keeps the gradient of rare
    demonstration tokens large: grad f = gamma / (p + gamma)^2 * grad p. SRFT (arXiv 2506.19767)
    uses the plain policy gradient A * grad log p. logp, mask: (N, T); A: (N,)."""
    objective = logp.exp() / (logp.exp() + gamma) if shaping else logp
    return -masked_mean(A[:, None] * objective, mask, denom=denom)


def policy_gradient_surrogate(logp, A, mask):
    """U_sur = mean_i A_i * mean_t log pi(y_i,t): its gradient estimates grad E[reward]."""
    return (A * masked_mean(logp, mask, dim=1)).mean()


# ---------------------------------------------------------------------------- mu controller
def entropy_signal(H_target: float, H: float) -> float:
    """g_H = H_target - H: positive when entropy collapses below target, pushing mu up."""
    return H_target - H


def normalize_meta_grad(g: float, v: float, n: int, beta: float = 0.9):
    """Divide dU/dmu by its running RMS (bias-corrected, as Adam's second moment).
    Returns (scaled g, new v, new n); the first call returns sign(g)."""
    v = beta * v + (1 - beta) * g * g
    n = n + 1
    rms = (v / (1 - beta ** n)) ** 0.5
    return (g / rms if rms > 0 else 0.0), v, n


def update_mu(mu, g_meta, g_H, eta_meta, eta_H, mu_min, mu_max):
    """mu <- clip(mu + eta_meta * g_meta + eta_H * g_H, mu_min, mu_max)."""
    return float(min(max(mu + eta_meta * g_meta + eta_H * g_H, mu_min), mu_max))


def loss_weights(method: str, mu: float, H: float = 0.0, warm: bool = False):
    """(w_RL, w_SFT) of each method's update w_RL g_RL + w_SFT g_SFT: one loop, many methods."""
    if warm or method == "sft":
        return 0.0, 1.0
    if method in ("grpo", "luffy", "sft-grpo"):   # sft-grpo: its SFT stage is the warm-up
        return 1.0, 0.0
    if method == "srft":                          # entropy-weighted SFT beside full RL
        return 1.0, 0.5 * math.exp(-H)            # w_SFT = 0.5 sg(exp(-H))
    return 1.0 - mu, mu                           # amft, its ablations, fixed-mix


def mix_grads(g_rl: dict, g_sft: dict, w_rl: float, w_sft: float) -> dict:
    """w_RL g_RL + w_SFT g_SFT per parameter (AMFT: w_RL = 1 - mu, w_SFT = mu); a gradient that
    was not computed counts as 0."""
    out = {k: w_rl * g for k, g in g_rl.items()}
    for k, g in g_sft.items():
        out[k] = out[k] + w_sft * g if k in out else w_sft * g
    return out


# ---------------------------------------------------------------------------- meta-gradient
def lookahead(params: dict, g_rl: dict, g_sft: dict, mu, alpha: float) -> dict:
    """theta'(mu) = theta - alpha [(1 - mu) g_RL + mu g_SFT]; mu may be a tensor with grad."""
    return {k: p - alpha * ((1 - mu) * g_rl[k] + mu * g_sft[k]) if k in g_rl else p
            for k, p in params.items()}


def dot(a: dict, b: dict) -> torch.Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a if k in b)


def meta_grad_first_order(grad_U: dict, g_rl: dict, g_sft: dict, alpha: float) -> float:
    """The paper's estimate: dU/dmu ~ -alpha <grad U(theta), g_SFT - g_RL>."""
    return (-alpha * (dot(grad_U, g_sft) - dot(grad_U, g_rl))).item()


def meta_grad_autograd(U, params, g_rl, g_sft, mu: float, alpha: float) -> float:
    """Exact dU_sur(theta'(mu))/dmu: mu is a leaf tensor, U is evaluated at theta'(mu) and
    backpropagated to mu. U: callable(params dict) -> scalar tensor."""
    ref = next(iter(params.values()))
    mu_t = torch.tensor(mu, dtype=ref.dtype, device=ref.device, requires_grad=True)
    theta = {k: p.detach() for k, p in params.items()}
    u = U(lookahead(theta, g_rl, g_sft, mu_t, alpha))
    (g,) = torch.autograd.grad(u, mu_t)
    return g.item()


@torch.no_grad()
def meta_grad_fd(U, params, g_rl, g_sft, mu: float, alpha: float, h: float = 1e-3) -> float:
    """Central finite difference [U(theta'(mu+h)) - U(theta'(mu-h))] / 2h."""
    theta = {k: p.detach() for k, p in params.items()}
    up = U(lookahead(theta, g_rl, g_sft, mu + h, alpha))
    down = U(lookahead(theta, g_rl, g_sft, mu - h, alpha))
    return ((up - down) / (2 * h)).item()
