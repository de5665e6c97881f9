// Umbrella header of ExaMoE.
#pragma once
#include <examoe/comm.hpp>
#include <examoe/config.hpp>
#include <examoe/device.hpp>
#include <examoe/error.hpp>
#include <examoe/metrics.hpp>
#include <examoe/moe_config.hpp>
#include <examoe/moe_layer.hpp>
#include <examoe/placement.hpp>
