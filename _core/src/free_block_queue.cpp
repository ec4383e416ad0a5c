// FreeBlockQueue: O(1) intrusive list of free block ids.
#include "llmapi/free_block_queue.h"

#include <stdexcept>

namespace llmapi {

FreeBlockQueue::FreeBlockQueue(int32_t num_blocks)
    : prev_(num_blocks), next_(num_blocks), in_queue_(num_blocks, 1),
      head_(num_blocks > 0 ? 0 : -1), tail_(num_blocks - 1), size_(num_blocks) {
  for (int32_t i = 0; i < num_blocks; ++i) {
    prev_[i] = i - 1;
    next_[i] = i + 1 < num_blocks ? i + 1 : -1;
  }
}

int32_t FreeBlockQueue::pop_front() {
  if (head_ < 0) throw std::logic_error("FreeBlockQueue::pop_front on an empty queue");
  int32_t id = head_;
  remove(id);
  return id;
}

void FreeBlockQueue::push_back(int32_t id) {
  if (in_queue_[id]) throw std::logic_error("block " + std::to_string(id) + " is already free");
  prev_[id] = tail_;
  next_[id] = -1;
  if (tail_ >= 0) next_[tail_] = id; else head_ = id;
  tail_ = id;
  in_queue_[id] = 1;
  ++size_;
}

void FreeBlockQueue::remove(int32_t id) {
  if (!in_queue_[id]) throw std::logic_error("block " + std::to_string(id) + " is not free");
  if (prev_[id] >= 0) next_[prev_[id]] = next_[id]; else head_ = next_[id];
  if (next_[id] >= 0) prev_[next_[id]] = prev_[id]; else tail_ = prev_[id];
  prev_[id] = next_[id] = -1;
  in_queue_[id] = 0;
  --size_;
}

std::vector<int32_t> FreeBlockQueue::to_vector() const {
  std::vector<int32_t> out;
  out.reserve(size_);
  for (int32_t id = head_; id >= 0; id = next_[id]) out.push_back(id);
  return out;
}

}  // namespace llmapi
