#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/data/idx.hpp"
#include "unimsg/data/sampler.hpp"

namespace unimsg {
namespace {

// --- DistributedSampler

TEST(DataSampler, EveryRankTakesItsStrideOfOneSharedOrder) {
  constexpr std::size_t kSize = 103;
  for (int world : {1, 2, 3, 4, 5}) {
    std::set<std::size_t> seen;
    for (int rank = 0; rank < world; ++rank) {
      DistributedSampler sampler(kSize, rank, world, 7);
      sampler.set_epoch(2);
      const auto mine = sampler.indices();
      ASSERT_EQ(mine.size(), kSize / static_cast<std::size_t>(world));
      for (std::size_t j = 0; j < mine.size(); ++j) {
        // The j-th sample of rank r is the global sample at r + j*W: the k-th local batch of all
        // ranks together is the k-th global batch of one process.
        EXPECT_EQ(
            mine[j],
            sampler.order()[static_cast<std::size_t>(rank) + j * static_cast<std::size_t>(world)]);
        EXPECT_TRUE(seen.insert(mine[j]).second) << "sample " << mine[j] << " given twice";
      }
    }
    EXPECT_EQ(seen.size(), kSize - kSize % static_cast<std::size_t>(world));
  }
}

TEST(DataSampler, OrderIsAPermutationThatDependsOnSeedAndEpoch) {
  DistributedSampler a(1000, 0, 1, 42);
  DistributedSampler b(1000, 0, 1, 42);
  a.set_epoch(3);
  b.set_epoch(3);
  EXPECT_EQ(a.order(), b.order());
  auto sorted = a.order();
  std::sort(sorted.begin(), sorted.end());
  for (std::size_t i = 0; i < sorted.size(); ++i) ASSERT_EQ(sorted[i], i);
  b.set_epoch(4);
  EXPECT_NE(a.order(), b.order());
  DistributedSampler c(1000, 0, 1, 43);
  c.set_epoch(3);
  EXPECT_NE(a.order(), c.order());
  DistributedSampler plain(10, 0, 1, 42, /*shuffle=*/false);
  EXPECT_EQ(plain.order(), (std::vector<std::size_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
}

TEST(DataSampler, ReshardingMidEpochNeitherRepeatsNorSkips) {
  constexpr std::size_t kSize = 1000;
  std::multiset<std::size_t> consumed;
  // 4 ranks take 37 samples each, then the job continues on 3 ranks from that position.
  std::size_t position = 0;
  for (int rank = 0; rank < 4; ++rank) {
    DistributedSampler sampler(kSize, rank, 4, 9);
    sampler.set_epoch(1);
    const auto mine = sampler.indices();
    consumed.insert(mine.begin(), mine.begin() + 37);
    position = sampler.position_after(37);
  }
  EXPECT_EQ(position, 4u * 37u);
  for (int rank = 0; rank < 3; ++rank) {
    DistributedSampler sampler(kSize, 0, 1, 9);
    sampler.set_epoch(1, position);
    sampler.reshard(rank, 3);
    const auto mine = sampler.indices();
    EXPECT_EQ(mine.size(), (kSize - position) / 3);
    consumed.insert(mine.begin(), mine.end());
  }
  std::set<std::size_t> distinct(consumed.begin(), consumed.end());
  EXPECT_EQ(distinct.size(), consumed.size()) << "a sample was given twice";
  EXPECT_EQ(consumed.size(), kSize - (kSize - position) % 3);
}

TEST(DataSampler, BadArgumentsAreClearErrors) {
  EXPECT_THROW(DistributedSampler(10, 3, 3, 1), ConfigError);
  EXPECT_THROW(DistributedSampler(10, 0, 0, 1), ConfigError);
  DistributedSampler sampler(10, 0, 2, 1);
  EXPECT_THROW(sampler.set_epoch(0, 11), ConfigError);
  EXPECT_THROW(sampler.reshard(-1, 2), ConfigError);
}

// --- IDX reader

class DataIdx : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("unimsg_idx_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static std::vector<std::uint8_t> idx(std::vector<std::uint32_t> dims, std::size_t body) {
    std::vector<std::uint8_t> bytes{0, 0, 0x08, static_cast<std::uint8_t>(dims.size())};
    for (auto d : dims) {
      for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back((d >> shift) & 0xFF);
    }
    for (std::size_t i = 0; i < body; ++i) bytes.push_back(static_cast<std::uint8_t>(i % 7));
    return bytes;
  }
  std::filesystem::path write(const std::string& name, const std::vector<std::uint8_t>& bytes) {
    const auto path = dir_ / name;
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
    return path;
  }
  std::filesystem::path write_gz(const std::string& name, const std::vector<std::uint8_t>& bytes) {
    const auto path = dir_ / name;
    gzFile file = gzopen(path.c_str(), "wb");
    gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(file);
    return path;
  }
  static void expect_error(const std::filesystem::path& path, const std::string& needle) {
    try {
      read_idx(path);
      ADD_FAILURE() << "read " << path << " without complaint";
    } catch (const DataError& error) {
      const std::string what = error.what();
      EXPECT_NE(what.find(needle), std::string::npos) << what;
      EXPECT_NE(what.find(path.filename().string()), std::string::npos) << what;
    }
  }

  std::filesystem::path dir_;
};

TEST_F(DataIdx, ReadsPlainAndGzipFiles) {
  const auto bytes = idx({3, 2, 2}, 12);
  for (const auto& path : {write("plain", bytes), write_gz("packed.gz", bytes)}) {
    const IdxArray array = read_idx(path);
    EXPECT_EQ(array.dims, (std::vector<std::uint32_t>{3, 2, 2}));
    ASSERT_EQ(array.data.size(), 12u);
    EXPECT_EQ(array.data[8], 8 % 7);
  }
}

TEST_F(DataIdx, RejectsTruncatedAndMalformedFiles) {
  auto truncated = idx({4, 5}, 20);
  truncated.resize(truncated.size() - 3);
  expect_error(write("truncated", truncated), "truncated");
  expect_error(write("trailing", idx({4, 5}, 23)), "trailing");
  expect_error(write("header", std::vector<std::uint8_t>{0, 0, 8, 3, 0, 0}), "truncated header");
  expect_error(write("tiny", std::vector<std::uint8_t>{0, 0}), "no header");
  auto magic = idx({2}, 2);
  magic[0] = 0x1f;
  expect_error(write("magic", magic), "two zero bytes");
  auto type = idx({2}, 2);
  type[2] = 0x0D;
  expect_error(write("type", type), "0x0d");
  expect_error(write("zero", idx({0, 3}, 0)), "is zero");
  expect_error(dir_ / "missing", "cannot open");
  // A gzip stream cut in the middle.
  const auto whole = write_gz("whole.gz", idx({1000}, 1000));
  std::ifstream in(whole, std::ios::binary);
  std::vector<char> gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  gz.resize(gz.size() / 2);
  std::vector<std::uint8_t> half(gz.begin(), gz.end());
  try {
    read_idx(write("half.gz", half));
    ADD_FAILURE() << "read a truncated gzip file";
  } catch (const DataError& error) {
    EXPECT_NE(std::string(error.what()).find("half.gz"), std::string::npos);
  }
}

TEST_F(DataIdx, LabelledImagesMustAgree) {
  const auto images = write("images", idx({3, 2, 2}, 12));
  const auto labels = write("labels", std::vector<std::uint8_t>{0, 0, 8, 1, 0, 0, 0, 3, 1, 9, 4});
  const LabelledImages set = read_labelled_images(images, labels);
  EXPECT_EQ(set.count, 3u);
  EXPECT_EQ(set.labels, (std::vector<std::uint8_t>{1, 9, 4}));
  const auto short_labels = write("short", std::vector<std::uint8_t>{0, 0, 8, 1, 0, 0, 0, 2, 1, 9});
  EXPECT_THROW(read_labelled_images(images, short_labels), DataError);
  const auto big_label = write("big", std::vector<std::uint8_t>{0, 0, 8, 1, 0, 0, 0, 3, 1, 10, 4});
  EXPECT_THROW(read_labelled_images(images, big_label), DataError);
  EXPECT_THROW(read_labelled_images(labels, labels), DataError);  // labels are not images
}

TEST(DataFashionMnist, TheInstalledDatasetReads) {
  const std::filesystem::path dir = "/usr/share/datasets/fashion-mnist";
  if (!std::filesystem::exists(dir / "t10k-images-idx3-ubyte.gz")) {
    GTEST_SKIP()
        << "Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it)";
  }
  const LabelledImages test =
      read_labelled_images(dir / "t10k-images-idx3-ubyte.gz", dir / "t10k-labels-idx1-ubyte.gz");
  EXPECT_EQ(test.count, 10000u);
  EXPECT_EQ(test.rows, 28u);
  EXPECT_EQ(test.cols, 28u);
  std::vector<int> per_class(10);
  for (auto label : test.labels) ++per_class[label];
  for (int count : per_class) EXPECT_EQ(count, 1000);  // the test set is balanced
}

}  // namespace
}  // namespace unimsg
