"""The real-LLM path: the bias and variance statistics of KL-gradient configurations on a Hugging Face causal LM.

Exact enumeration is impossible on a real model, so this package samples completions, scores them under the
policy pi_theta and the reference pi_ref, differentiates every configuration's per-sample surrogate
(``biaslab.core.placements``) on a chosen parameter subset, and compares the sample means with an unbiased reference
gradient of the reverse KL(pi_theta || pi_ref) with calibrated tests and confidence intervals (``calibration``).

Modules (one idea each): ``models`` (offline loading), ``policy`` (the LoRA adapter that makes pi_theta differ
from pi_ref), ``sample`` (batched generation and scoring), ``grads`` (per-sample gradients on a parameter subset),
``distributed`` (torch.distributed and exact gathering), ``run`` (the statistics pass), ``calibration`` (paired
bootstrap tests, Fieller intervals, Holm, and their simulation on enumerable models), ``recipes`` (framework
presets and user losses measured per group), ``enumerate`` (exact
expectations on tiny models), ``figure`` and ``sweep`` (PNG + CSV + JSON), ``cli`` (``biaslab llm``).
Needs the ``llm`` extra: ``pip install 'biaslab[llm]'``.
"""
