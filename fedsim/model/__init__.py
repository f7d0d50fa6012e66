"""The language model a client trains and the server scores.

- `loader`: registry names, local folders and cached hub ids → (model, tokenizer).
- `adapter`: PEFT LoRA on the model, and the adapter as a state dict / Flower ArrayRecord.
- `training`: local training steps and evaluation (loss, exact match, per example).
- `packed` (with `packed_jobs`, `rowlora`): many clients' LoRA trained in one batched step over one
  shared base model.
- `fedspeed`: FedSpeed's local rule (prox-correction and the merged ascent gradient).
"""
