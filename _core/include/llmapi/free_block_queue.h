// FreeBlockQueue: the KV blocks with no reference, in eviction (LRU) order.
#pragma once

#include <cstdint>
#include <vector>

namespace llmapi {

// An intrusive doubly linked list over block ids 0..N-1. The head is the next block handed out
// (and, if it still holds a cached prefix, the next one evicted); freed blocks join the tail.
// A cached block hit by a prefix lookup leaves from the middle, hence the links: push_back,
// pop_front and remove are all O(1), with no allocation after construction.
class FreeBlockQueue {
 public:
  // Starts holding every block in id order: 0 is handed out first.
  explicit FreeBlockQueue(int32_t num_blocks);

  int32_t size() const { return size_; }
  bool contains(int32_t block_id) const { return in_queue_[block_id] != 0; }
  int32_t pop_front();
  void push_back(int32_t block_id);
  void remove(int32_t block_id);
  std::vector<int32_t> to_vector() const;  // head first

 private:
  std::vector<int32_t> prev_, next_;  // -1 ends the list
  std::vector<char> in_queue_;
  int32_t head_ = -1, tail_ = -1, size_ = 0;
};

}  // namespace llmapi
