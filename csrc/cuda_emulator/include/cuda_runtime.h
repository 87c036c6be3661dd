#pragma once
// Emulator build only (this folder is first on its include path): the CUDA header that the
// device code includes, served by the CPU emulator.
#include "cuda_emulator/cuda_emulator.h"
