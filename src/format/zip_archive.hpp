// taskvec format layer: the directory of a zip archive of STORED entries (a PyTorch checkpoint is one;
// internal header). Reads the End Of Central Directory record (and its zip64 record and locator), the
// central directory and every entry's local header; never reads entry data and never inflates.
//
// Byte layout (PKWARE APPNOTE.TXT 6.3.10; all integers little-endian):
//
//   offset 0                                                                               file size
//   +--------------+------+----+-----+--------------+----------------+------------+-----+------+
//   | local header | data | DD | ... | central dir: | zip64 EOCD     | zip64 EOCD | EOCD        |
//   | entry 0      |      |    |     | n headers    | record (opt.)  | locator    | + comment   |
//   +--------------+------+----+-----+--------------+----------------+------------+-----+------+
//
//   local header  (30 bytes + name + extra)          central header (46 bytes + name + extra + comment)
//     0  u32 signature 0x04034b50 "PK\3\4"             0  u32 signature 0x02014b50 "PK\1\2"
//     4  u16 version needed                            4  u16 version made by   6 u16 version needed
//     6  u16 flags (bit 0 encrypted, bit 3: sizes      8  u16 flags            10 u16 method (0 = stored)
//            are 0 here, a data descriptor DD          12 u16 time  14 u16 date 16 u32 CRC-32
//            follows the data; torch sets it)          20 u32 compressed size  24 u32 uncompressed size
//     8  u16 method   10 u16 time  12 u16 date         28 u16 name length      30 u16 extra length
//    14  u32 CRC-32   18 u32 compressed size           32 u16 comment length   34 u16 disk number
//    22  u32 uncompressed size                         36 u16 internal attrs   38 u32 external attrs
//    26  u16 name length  28 u16 extra length          42 u32 local header offset
//    30  name, extra, then the entry's data            46 name, extra, comment
//
//   zip64 extra field (in `extra`, id 0x0001): u64 uncompressed size, u64 compressed size, u64 local
//   header offset, u32 disk: each present only when the 32-bit field above is 0xFFFFFFFF (0xFFFF).
//
//   EOCD (22 bytes + comment, ends the file)          zip64 EOCD locator (20 bytes, just before EOCD)
//     0  u32 signature 0x06054b50 "PK\5\6"              0  u32 signature 0x07064b50 "PK\6\7"
//     4  u16 disk   6 u16 disk of central dir           4  u32 disk of the zip64 EOCD record
//     8  u16 entries on this disk  10 u16 entries       8  u64 offset of the zip64 EOCD record
//    12  u32 central dir size  16 u32 its offset       16  u32 number of disks
//    20  u16 comment length, then the comment
//                                                     zip64 EOCD record (56 bytes + extensible data)
//                                                       0  u32 signature 0x06064b50 "PK\6\6"
//   torch (PyTorchStreamWriter, miniz) writes every     4  u64 size of the rest  12 u16 made by
//   entry STORED, its data 64-byte aligned (padding    14  u16 needed  16 u32 disk  20 u32 disk of CD
//   in the local extra field, id "FB"), flag bit 3     24  u64 entries on this disk  32 u64 entries
//   set, and always the zip64 EOCD record + locator.   40  u64 central dir size  48 u64 its offset
//
// Every check below throws Error{kInvalidArchive} with a message naming the file (label) and the entry.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace taskvec::format_detail {

/// Most entries accepted in one archive (a torch checkpoint has one per storage plus ~4).
inline constexpr std::uint64_t kMaxZipEntries = 1'000'000;
/// Largest central directory read, bytes (1,000,000 entries with 200-byte names fit).
inline constexpr std::uint64_t kMaxZipCentralDirectory = std::uint64_t{256} << 20;

/// One STORED entry of the archive.
struct ZipEntry {
  std::string name;                    ///< as stored (UTF-8 or CP437 bytes), '/'-separated
  std::uint64_t local_header_offset = 0;  ///< absolute file offset of the entry's local header
  std::uint64_t data_offset = 0;       ///< absolute file offset of the first data byte
  std::uint64_t size = 0;              ///< data bytes (stored: compressed size == uncompressed size)
  std::uint32_t crc32 = 0;             ///< from the central directory; not verified (data is never read here)
};

/// Reads `dst.size()` bytes at absolute offset `offset` of the archive, or throws (MappedFile::read_at).
using ZipReadAt = std::function<void(std::uint64_t offset, std::span<std::byte> dst)>;

/// The validated directory of a zip archive whose entries are all STORED.
struct ZipDirectory {
  std::vector<ZipEntry> entries;                 ///< central directory order
  std::map<std::string, std::size_t, std::less<>> by_name;  ///< name -> index in entries
  bool zip64 = false;                            ///< the zip64 EOCD record was used
  std::uint64_t central_directory_offset = 0;    ///< absolute offset; every entry's data ends at or before it

  /// The entry named exactly `name`, or nullptr.
  const ZipEntry* find(std::string_view name) const noexcept;
};

/// Reads and validates the directory of an archive of `file_size` bytes through `read_at` (at most
/// 64 KiB for the EOCD search, the central directory, and 30 + name + extra bytes per local header).
/// Throws Error{kInvalidArchive} naming `label` (and the entry) when: the file is shorter than 22 bytes or
/// no EOCD ends it (truncated, or not a zip); it spans several disks; the zip64 locator or record is
/// malformed or disagrees with the EOCD; the central directory lies outside the file, is larger than
/// kMaxZipCentralDirectory, has more than kMaxZipEntries entries, a bad signature, or a header cut short;
/// an entry name is empty, not valid UTF-8, has a control character or backslash, is absolute ('/' first)
/// or has a ".." component, or occurs twice; an entry is encrypted, is compressed (method != 0; the
/// message adds a zip-bomb ratio of 100x or more), or is stored with an uncompressed size larger than its
/// stored size (a zip-bomb ratio) or smaller; its local header is past the end, has a bad signature, or disagrees with the central
/// header (name, method, sizes when flag bit 3 is clear); its data does not end before the central
/// directory; two entries overlap. Throws what `read_at` throws (Error{kIo}).
ZipDirectory read_zip_directory(std::uint64_t file_size, const ZipReadAt& read_at, const std::string& label);

}  // namespace taskvec::format_detail
