"""The ResNet symbols the image-classification trainer builds (runs in the MXNet algorithm environment only).

Pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks", 2016), the family SageMaker's
built-in algorithm trains, with the layer names of MXNet's model zoo (`bn_data`, `conv0`, `stage1_unit1_bn1`, ...,
`flatten0`, `fc1`) so a model from either backend loads the same way.

- ImageNet depths 18/34/50/101/152/200: 7x7/2 stem and max pool, four stages (64-512 filters, bottleneck from 50).
- CIFAR depths 20/32/44/56/110: 3x3 stem, three stages of (depth - 2) / 6 basic units, 16-64 filters.

The network's first layer is a BatchNorm on the raw 0-255 RGB pixels (`bn_data`), so callers feed pixels as they are.
Heads: multi-class ends in `SoftmaxOutput` named `softmax` (as the built-in); multi-label trains on a (weighted)
binary cross-entropy from the logits and its saved inference symbol ends in a sigmoid named `sigmoid`.
"""

from __future__ import annotations

import mxnet as mx
from ic_hyperparams import CIFAR_DEPTHS

BN_EPS = 2e-5
BN_MOM = 0.9
_IMAGENET_UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_IMAGENET_UNITS[200] = (3, 24, 36, 3)


def _bn(data: mx.sym.Symbol, name: str) -> mx.sym.Symbol:
    return mx.sym.BatchNorm(data, fix_gamma=False, eps=BN_EPS, momentum=BN_MOM, name=name)


def _unit(data, num_filter: int, stride: int, dim_match: bool, name: str, bottleneck: bool):
    """One pre-activation residual unit: BN-ReLU-conv twice (basic) or three times (bottleneck) plus a shortcut."""
    act1 = mx.sym.Activation(_bn(data, f"{name}_bn1"), act_type="relu", name=f"{name}_relu1")
    if bottleneck:
        inner = num_filter // 4
        conv1 = mx.sym.Convolution(act1, num_filter=inner, kernel=(1, 1), no_bias=True, name=f"{name}_conv1")
        act2 = mx.sym.Activation(_bn(conv1, f"{name}_bn2"), act_type="relu", name=f"{name}_relu2")
        conv2 = mx.sym.Convolution(
            act2, num_filter=inner, kernel=(3, 3), stride=(stride, stride), pad=(1, 1), no_bias=True,
            name=f"{name}_conv2",
        )  # fmt: skip
        act3 = mx.sym.Activation(_bn(conv2, f"{name}_bn3"), act_type="relu", name=f"{name}_relu3")
        body = mx.sym.Convolution(act3, num_filter=num_filter, kernel=(1, 1), no_bias=True, name=f"{name}_conv3")
    else:
        conv1 = mx.sym.Convolution(
            act1, num_filter=num_filter, kernel=(3, 3), stride=(stride, stride), pad=(1, 1), no_bias=True,
            name=f"{name}_conv1",
        )  # fmt: skip
        act2 = mx.sym.Activation(_bn(conv1, f"{name}_bn2"), act_type="relu", name=f"{name}_relu2")
        body = mx.sym.Convolution(
            act2, num_filter=num_filter, kernel=(3, 3), pad=(1, 1), no_bias=True, name=f"{name}_conv2"
        )
    if dim_match:
        shortcut = data
    else:
        shortcut = mx.sym.Convolution(
            act1, num_filter=num_filter, kernel=(1, 1), stride=(stride, stride), no_bias=True, name=f"{name}_sc"
        )
    return body + shortcut


def features(num_layers: int, image_channels: int = 3) -> mx.sym.Symbol:
    """The ResNet trunk up to `flatten0` (global-average-pooled features) for `num_layers`."""
    del image_channels  # the data shape is bound later; kept for readability at call sites
    data = mx.sym.Variable("data")
    data = mx.sym.BatchNorm(data, fix_gamma=True, eps=BN_EPS, momentum=BN_MOM, name="bn_data")
    if num_layers in CIFAR_DEPTHS:
        units, filters, bottleneck = ((num_layers - 2) // 6,) * 3, (16, 16, 32, 64), False
        body = mx.sym.Convolution(data, num_filter=filters[0], kernel=(3, 3), pad=(1, 1), no_bias=True, name="conv0")
    else:
        units = _IMAGENET_UNITS[num_layers]
        bottleneck = num_layers >= 50
        filters = (64, 256, 512, 1024, 2048) if bottleneck else (64, 64, 128, 256, 512)
        body = mx.sym.Convolution(
            data, num_filter=filters[0], kernel=(7, 7), stride=(2, 2), pad=(3, 3), no_bias=True, name="conv0"
        )
        body = mx.sym.Activation(_bn(body, "bn0"), act_type="relu", name="relu0")
        body = mx.sym.Pooling(body, kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="max", name="pooling0")
    for stage, count in enumerate(units):
        stride = 1 if stage == 0 else 2
        name = f"stage{stage + 1}_unit"
        body = _unit(body, filters[stage + 1], stride, False, f"{name}1", bottleneck)
        for unit in range(2, count + 1):
            body = _unit(body, filters[stage + 1], 1, True, f"{name}{unit}", bottleneck)
    body = mx.sym.Activation(_bn(body, "bn1"), act_type="relu", name="relu1")
    pooled = mx.sym.Pooling(body, global_pool=True, kernel=(7, 7), pool_type="avg", name="pool1")
    return mx.sym.Flatten(pooled, name="flatten0")


def logits(num_layers: int, num_classes: int) -> mx.sym.Symbol:
    return mx.sym.FullyConnected(features(num_layers), num_hidden=num_classes, name="fc1")


def training_symbol(num_layers: int, num_classes: int, multi_label: bool) -> mx.sym.Symbol:
    """The symbol trained by the Module: outputs[0] are probabilities (B, C) or (B, C) softmax.

    Multi-label: per-sample binary cross-entropy from the logits, summed over labels, with a positive-class weight
    per label taken from the fixed input `pos_weight` (1, C) (all ones unless `use_weighted_loss=1`).
    """
    fc = logits(num_layers, num_classes)
    if not multi_label:
        return mx.sym.SoftmaxOutput(fc, name="softmax")
    label = mx.sym.Variable("softmax_label")
    pos_weight = mx.sym.Variable("pos_weight", shape=(1, num_classes))
    # softplus(-x) = -log(sigmoid(x)) and softplus(x) = -log(1 - sigmoid(x)); MXNet's softrelu is overflow-safe.
    neg_log_p = mx.sym.Activation(-fc, act_type="softrelu")
    neg_log_q = mx.sym.Activation(fc, act_type="softrelu")
    per_label = mx.sym.broadcast_mul(pos_weight, label * neg_log_p) + (1 - label) * neg_log_q
    loss = mx.sym.MakeLoss(mx.sym.sum(per_label, axis=1), name="bce")
    prob = mx.sym.BlockGrad(mx.sym.sigmoid(fc), name="prob")
    return mx.sym.Group([prob, loss])


def inference_symbol(num_layers: int, num_classes: int, multi_label: bool) -> mx.sym.Symbol:
    """The symbol saved as `image-classification-symbol.json`: data (B, C, H, W) pixels → probabilities (B, C)."""
    fc = logits(num_layers, num_classes)
    if multi_label:
        return mx.sym.sigmoid(fc, name="sigmoid")
    return mx.sym.SoftmaxOutput(fc, name="softmax")
