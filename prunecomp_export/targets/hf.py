"""The ``hf`` target: the plain Hugging Face checkpoint itself.

Every run writes it (``<output>/checkpoint``) and verifies it by reloading with
``AutoModelForCausalLM`` (logits equal the in-memory pruned model's; cached and uncached greedy
generation agree), so this target has no build step of its own; it exists so ``--target hf``
names what users get.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from prunecomp_export.targets import Target


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HfTarget(Target):
    name = "hf"
    Options = Options


TARGET = HfTarget()
