"""KernelWarehouse: a faithful, modern PyTorch reimplementation (ICML 2024, Li and Yao)."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# tools/plot_logs.py (matplotlib) and tools/export_onnx.py (torch.onnx's dynamo exporter needs onnx and
# onnxscript; the exported model is checked with onnxruntime)
TOOLS_REQUIRES = ['matplotlib', 'onnx', 'onnxscript', 'onnxruntime']


class BuildPy(build_py):
    """Also installs the repository's ``utils.py`` as ``kernelwarehouse/utils.py``: the detection plugin
    imports its checkpoint I/O as ``kernelwarehouse.utils``, so that no top-level ``utils`` module (a name
    that many projects use) goes into site-packages. A checkout or an editable install needs no copy:
    ``kernelwarehouse``'s ``__path__`` includes the repository root there."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file('utils.py', os.path.join(self.build_lib, 'kernelwarehouse', 'utils.py'))


setup(
    name='kernelwarehouse',
    version='0.1.0',
    description='KernelWarehouse dynamic convolution: models, training and evaluation on modern PyTorch/timm',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    # `models` and `modules` as the repository's scripts import them, and the same packages under
    # `kernelwarehouse.` for projects that have a `models` or `modules` package of their own; `detection`
    # (the mmdetection plugin, `detection.kw_mmdet`) as the detection configs' custom_imports name it
    packages=find_packages(include=['models', 'models.*', 'modules', 'modules.*', 'detection', 'detection.*']) + [
        'kernelwarehouse', 'kernelwarehouse.models', 'kernelwarehouse.modules',
        'kernelwarehouse.modules.kernel_warehouse'],
    package_dir={'kernelwarehouse.models': 'models', 'kernelwarehouse.modules': 'modules',
                 'kernelwarehouse.modules.kernel_warehouse': 'modules/kernel_warehouse'},
    cmdclass={'build_py': BuildPy},
    install_requires=[
        # Pinned exactly: these builds are available locally; other versions download gigabytes.
        'torch==2.14.1',
        'torchvision==0.29.1',
        'timm>=1.0,<2',
        'tensorboardX',
        'six',
        'numpy',
        'scikit-learn',  # the DIGITS demo dataset
    ],
    extras_require={
        'tools': TOOLS_REQUIRES,
        'test': ['pytest', *TOOLS_REQUIRES],  # the tests run the tools too
    },
)
