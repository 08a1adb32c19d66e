#include <gtest/gtest.h>

#include "unimsg/kernels/device.hpp"

namespace {

TEST(GpuDevice, QueryNamesTheDevice) {
  const auto info = unimsg::query_devices();
  if (info.count == 0) GTEST_SKIP() << "no GPU: " << info.reason;
  EXPECT_GT(info.count, 0);
  EXPECT_FALSE(info.name.empty());
}

}  // namespace
