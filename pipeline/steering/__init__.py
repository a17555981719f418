"""Steering the final block's pruning through SAE latents: the strategy registry (`strategies`),
the sweep and its tally (`sweep`), the headline rule that chooses alphas on one split and
reports them on another (`headline`), bootstrap intervals and nulls (`uncertainty`), and the
analysis that turns a sweep into the numbers the report shows (`analysis`)."""
