#pragma once

// Waiting for what another thread or process will do, with nothing to sleep on: poll in a tight
// loop first (the answer is often close), then yield the core between polls, then sleep between
// polls — a long wait must not take, on an oversubscribed node, the core of the rank it waits
// for. One policy for every such loop (a Work's wait, NCCL's enqueue, the bus's drive loop);
// each picks its round counts, and what a sleep means where it has an event to sleep on.

#include <chrono>
#include <cstdint>
#include <thread>

namespace unimsg {

class Backoff {
 public:
  enum class Step { kSpin, kYield, kSleep };

  // `spin_rounds` rounds of kSpin, then `yield_rounds` of kYield, then kSleep.
  constexpr Backoff(std::uint64_t spin_rounds, std::uint64_t yield_rounds) noexcept
      : spin_(spin_rounds), yield_end_(spin_rounds + yield_rounds) {}

  // The step after one more idle round.
  constexpr Step next() noexcept {
    const std::uint64_t round = rounds_++;
    if (round < spin_) return Step::kSpin;
    return round < yield_end_ ? Step::kYield : Step::kSleep;
  }
  // Something happened: tight polling again.
  constexpr void reset() noexcept { rounds_ = 0; }
  constexpr std::uint64_t rounds() const noexcept { return rounds_; }

  // next(), carried out: nothing for kSpin (the poll itself is the wait), the core given up for
  // kYield, `nap` for kSleep.
  void pause(std::chrono::microseconds nap) {
    switch (next()) {
      case Step::kSpin:
        break;
      case Step::kYield:
        std::this_thread::yield();
        break;
      case Step::kSleep:
        std::this_thread::sleep_for(nap);
        break;
    }
  }

 private:
  std::uint64_t spin_;
  std::uint64_t yield_end_;
  std::uint64_t rounds_ = 0;
};

}  // namespace unimsg
