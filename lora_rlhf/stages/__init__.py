"""Layer 4, the InstructGPT steps, one module (or package) each: `sft`, `compare` (+ `labelers`), `reward`
(+ `rankings`), `ppo/`, `eval/`, and `pipeline`, which chains them. Stages import core, hub, tasks and
labeling; nothing below imports a stage.
"""
