"""The paper's method as pure code, testable without a model or a file.

The loss terms as functions of tensors and masks (:mod:`.losses`), the stages and the schedule
that walks them (:mod:`.schedule`), every algorithm as one record of stages and terms
(:mod:`.algorithms`), and the measures of how much a student's internals resemble the teacher's
(:mod:`.diagnostics`).
"""
