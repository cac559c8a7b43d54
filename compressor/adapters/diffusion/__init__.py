"""Diffusion models in the pipeline: a diffusers denoiser with its conditioner and sampling recipe.

``model`` (DiffusionModel, SamplingSpec), ``conditioners`` (class / label / text), ``builders``
(denoiser -> DiffusionModel), ``loading`` (teacher and student folders), ``step_reduced_pipeline``
(the serving pipeline a student is exported as), ``adapter`` (DiffusersAdapter) and ``schedule``
(training noise schedules, diffusers schedulers). Import from the defining module; this
package imports nothing, so ``import compressor.adapters`` never needs diffusers.
"""
