"""Layer 4, the InstructGPT steps, one module (or package) each: `data`, `sft`, `compare` (+ `labelers`),
`reward` (+ `rankings`), `dpo`, `ppo/`, `eval/`; each keeps the contract in `stage` and is registered once in
`registry`, through which `pipeline` chains them and the commands run them. Stages import core, hub, tasks and
labeling; nothing below imports a stage.
"""
