"""OpenAI / OpenCLIP PyTorch weights -> jclip params and checkpoints.

    params = jclip.convert.from_open_clip(state_dict, "ViT-B-32")

    python -m jclip.convert --model ViT-B-32 --input open_clip_model.safetensors --output runs/vit_b32
"""

from jclip.convert.open_clip import conversion_rules, from_open_clip
from jclip.convert.state_dict_files import load_state_dict
from jclip.convert.to_checkpoint import save_converted

__all__ = ["conversion_rules", "from_open_clip", "load_state_dict", "save_converted"]
