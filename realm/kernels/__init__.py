"""Realm's native kernel library: checked numpy entry points to the C kernels.

Weights use GGML's types and block layouts; activations are float32. See docs/kernels.md.
The kernels take ``device="cpu"`` (default) or ``"cuda"``; the CUDA library is optional and
loaded only when asked for (``cuda_status()`` says whether it can be used here).
"""

from ._cuda import CudaDevice as CudaDevice
from ._cuda import CudaUnavailable as CudaUnavailable
from ._cuda import DeviceArray as DeviceArray
from ._cuda import cuda_available as cuda_available
from ._cuda import cuda_device as cuda_device
from ._cuda import cuda_status as cuda_status
from ._cuda import parse_device as parse_device
from ._cuda import to_device as to_device
from ._cuda_forward import CudaTransformer as CudaTransformer
from ._cuda_forward import DeviceKV as DeviceKV
from ._forward import LORA_ROLES as LORA_ROLES
from ._forward import LayerWeights as LayerWeights
from ._forward import LoraPair as LoraPair
from ._forward import Matrix as Matrix
from ._forward import NativeAdapter as NativeAdapter
from ._forward import NativeTransformer as NativeTransformer
from ._forward import SeqStep as SeqStep
from ._forward import TransformerSpec as TransformerSpec
from ._ops import MAX_HEAD_DIM as MAX_HEAD_DIM
from ._ops import PACKABLE as PACKABLE
from ._ops import Packed as Packed
from ._ops import active_isa as active_isa
from ._ops import add as add
from ._ops import attention as attention
from ._ops import dequantize as dequantize
from ._ops import detected_isa as detected_isa
from ._ops import geglu as geglu
from ._ops import get_rows as get_rows
from ._ops import matmul as matmul
from ._ops import matmul_path as matmul_path
from ._ops import pack as pack
from ._ops import pack_preferred as pack_preferred
from ._ops import quantize as quantize
from ._ops import read_bandwidth as read_bandwidth
from ._ops import rmsnorm as rmsnorm
from ._ops import rope as rope
from ._ops import set_isa as set_isa
from ._ops import set_threads as set_threads
from ._ops import softcap as softcap
from ._ops import softmax as softmax
from ._ops import swiglu as swiglu
from ._ops import threads as threads
from ._ops import use_isa as use_isa
from ._types import Activation as Activation
from ._types import Isa as Isa
from ._types import RopeMode as RopeMode
from ._types import WeightType as WeightType
