"""Step error: a chaos-free comparison of a candidate's transformer with the reference's.

The sampler turns an ulp of difference into decibels on chaotic samples, so image metrics move with
a machine's arithmetic. Step error does not let errors compound: the reference run keeps its
trajectory at a few recorded steps (the latent entering the step, the embeddings, the timestep and
its guided output), and the candidate's transformer is evaluated on exactly those inputs. Per sample
it records the relative L2 error and the cosine of the guided outputs at each recorded step, and
their means (`step_error`, `step_cosine`).

- `steps`: which steps are recorded (no torch);
- `trajectory`: recording the reference's trajectory, and the teacher-forced candidate evaluation;
- `profile`: each block's and layer's own error, both models in one process (the layer profile);
- `locate`: the profile against the baseline's: layers gates and the broken layer named (no torch);
- `screening`: screening.jsonl, every sample's step error scored before any candidate image (no torch);
- `in_run`: what a suite run asks of all this, batch by batch (the run's screening phase itself is
  `evals.run_screening`).
"""
