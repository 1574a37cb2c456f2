"""One distillation run on one machine: data in, a trained student and its records out.

Tasks, files and tokenisation (:mod:`.data`, users' own files in :mod:`.sources`), teacher and
student models and layer maps (:mod:`.models`), the one training step and evaluation
(:mod:`.engine`), the fine-tuned teacher (:mod:`.teacher`) and what the losses take from it
(:mod:`.teacher_outputs`), the run itself (:mod:`.distill`) and a student's latency
(:mod:`.footprint`). Knows nothing of Ray: an experiment injects its callbacks.
"""
