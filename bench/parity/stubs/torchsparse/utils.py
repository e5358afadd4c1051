"""``make_ntuple`` as in torchsparse.utils."""


def make_ntuple(x, ndim: int) -> tuple:
    if isinstance(x, (list, tuple)):
        if len(x) != ndim:
            raise ValueError(f"expected {ndim} values, got {x}")
        return tuple(int(v) for v in x)
    return (int(x),) * ndim
