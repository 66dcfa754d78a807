"""Whole pipelines in stages: every heavy module of a diffusers video pipeline under one memory budget.

    >>> pipe = fxstream.compile_pipeline(pipe, fxstream.Policy(max_memory="6GiB"))   # same object, compiled
    >>> fxstream.explain_pipeline(pipe, height=576, width=1024, num_frames=25,
    ...                           policy=fxstream.Policy(max_memory="6GiB")).table()

A pipeline runs in three **stages**, one after another:

- ``encode``: SVD's CLIP image encoder, then its VAE encoder on the conditioning image (in float32 when the VAE is
  float16 and ``force_upcast`` is set, as the pipeline does); AnimateDiff's text encoder (once per prompt, and
  once more for the negative prompt under classifier-free guidance);
- ``denoise``: the UNet, once per denoising step (classifier-free guidance doubles its batch);
- ``decode``: the VAE decoder, chunk by chunk, then ``decode_latents`` concatenates the chunks' frames and casts
  them to float32.

The budget (``Policy.max_memory``, weights included) applies to each stage: the weights resident during it (its
own modules', and those of the modules it does not use unless they are offloaded), the tensors the pipeline
holds across the call (the module's inputs; while decoding, the frames of earlier chunks) and the module's
planned activations. :func:`compile_pipeline` compiles the UNet and the VAE decoder (halo slicing along height:
:class:`~fxstream.Policy` ``halo``) each with ``max_memory = budget - the other weights resident - what the
pipeline holds``. Modules a stage does not use stay where they are while that budget can be met with them
resident at no more than 1.5x the stage's FLOPs (``AUTO_OFFLOAD_COMPUTE``: the halo passes a tight decoder budget
costs), and move to the CPU (plain ``.to()`` calls, from forward pre-hooks) when it cannot or when moving them
plans less compute (``offload=`` changes the rule); on a pipeline that runs on the CPU nothing moves and the decisions are only recorded (``pipe.fxstream``).
The accelerator is where the pipeline's modules are, or ``compile_pipeline(..., device="cuda")`` for a pipeline
left on the CPU whose weights together exceed the budget.

Exact decoding: SVD's temporal decoder mixes frames, so decoding in chunks of ``decode_chunk_size < num_frames``
frames changes the video. A compiled SVD pipeline always decodes ``num_frames`` frames at once (its
``decode_latents`` is wrapped; the ``decode_chunk_size`` argument is ignored): the frames of the uncompiled
pipeline called with ``decode_chunk_size=num_frames`` (diffusers' default), at the memory the budget allows.
AnimateDiff's VAE decodes every frame on its own, so its chunks (``decode_chunk_size``, default 16) never change
the video and are kept.

Not counted: the pipeline's small tensors besides a module's inputs (latents, scheduler temporaries: a few
latent-sized tensors), and ``postprocess_video`` after ``decode_latents`` (the conversion to the output type).

The package: ``parts`` (the pipeline's components, which stage runs which, their bytes, each stage's policy),
``fitting`` (one step into the budget, resident or offloaded), ``offload`` (:func:`compile_pipeline`, the stage
modules and hooks, :class:`PipelineState`), ``planning`` (:func:`explain_pipeline`: each stage's inputs, plans on
meta copies), ``reports`` (:class:`PipelineReport` and its parts, the timeline and its plot).
"""
from .fitting import AUTO_OFFLOAD_COMPUTE
from .offload import PipelineState, StageModule, compile_pipeline, normal_device, planned_moves
from .parts import STAGES, PipelineBudgetError, module_bytes, pipeline_kind, stage_policy
from .planning import explain_pipeline
from .reports import PipelinePoint, PipelineReport, StageReport, StepReport

__all__ = ["compile_pipeline", "explain_pipeline", "PipelineReport", "StageReport", "StepReport", "PipelinePoint",
           "PipelineState", "PipelineBudgetError", "STAGES", "AUTO_OFFLOAD_COMPUTE", "StageModule", "pipeline_kind",
           "planned_moves", "normal_device", "module_bytes", "stage_policy"]
