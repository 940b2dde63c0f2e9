"""OCD core: the method of "OCD: Learning to Overfit with Conditional Diffusion Models".

Read it like the paper: targets -> noise schedule -> denoiser -> sampler -> adapt.
Nothing here knows about HTTP.
"""

__version__ = "0.2.0"
