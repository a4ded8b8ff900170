"""The ML core: models, the soft-token bridge, wire codec, checkpoints and tasks. No sockets.

    models.py, embedded.py, presets/   model specs: embedded presets, random:NAME, files, folders
    lm.py                              LanguageModel: one loaded model + tokenizer, hidden states, logits
    resampler.py                       the bridge: Perceiver resampler encoder + receiver-side adapter
    codec.py                           soft tokens ↔ wire tensors (fp32/fp16/bf16/int8)
    checkpoint.py                      bridge checkpoints (safetensors + JSON meta, fingerprints)
    tasks.py                           task specs: labels, prompts
    classify.py                        `telepathy classify`: one process, no services
    runtime/                           engines that serve a batch: eager (reference) and the fast path
    training/                          train, evaluate, baselines, hidden-state cache, data, report

The services (telepathy.sender_service, …) call into this package; it imports none of them.
"""
