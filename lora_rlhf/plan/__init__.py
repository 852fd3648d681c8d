"""`lora-rlhf plan`: predict each stage's peak memory from a recipe and the model's config alone.

    model_shape   a model's dimensions and parameter counts from config.json (shipped configs work offline)
    estimate      the per-stage formulas: pure functions returning named parts, phase by phase
    recipe_plan   a recipe (with its defaults resolved) -> every stage's estimate
    advice        the ranked knobs, with `--set` lines, when a stage does not fit
    preflight     the check a stage runs before loading, and the peak-memory helpers
"""
