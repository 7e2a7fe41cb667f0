# TEMP stub until the sampler branch lands
import torch
DEFAULT_SEED = 42
def token_logprobs(logits, targets, params, k):
    lp = torch.ops.detcompile.softmax(logits, -1, False, True)
    return lp.gather(1, targets[:, None])[:, 0], None
def sample_rows(logits, seqs, eos):
    lp = torch.ops.detcompile.softmax(logits, -1, False, True)
    toks = logits.argmax(-1)
    return toks.tolist(), lp.gather(1, toks[:, None])[:, 0].tolist(), [[] for _ in seqs]
