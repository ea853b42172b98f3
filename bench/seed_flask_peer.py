"""The vendor page's Flask receiver (../shared/seed/, the page lost its
indentation), re-indented and otherwise unchanged, as the bench's peer.
Only the port comes from argv. Needs: pip install flask requests."""

import os
import sys
from urllib.parse import urlparse

import requests
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.route('/suno-cover-callback', methods=['POST'])
def handle_callback():
    data = request.json
    code = data.get('code')
    msg = data.get('msg')
    callback_data = data.get('data', {})
    task_id = callback_data.get('taskId')
    images = callback_data.get('images')
    print(f"收到封面生成回调: {task_id}, 状态: {code}, 消息: {msg}")
    if code == 200:
        # 任务成功完成
        print("封面生成完成")
        if images:
            print("生成的封面图片:")
            for i, image_url in enumerate(images, 1):
                print(f"封面{i}: {image_url}")
            # 下载封面图片
            download_images(images, task_id)
    else:
        # 任务失败
        print(f"封面生成失败: {msg}")
        # 处理失败情况...
    # 返回200状态码确认收到回调
    return jsonify({'status': 'received'}), 200


def download_images(image_urls, task_id):
    """下载封面图片"""
    dir_path = f"covers/{task_id}"
    os.makedirs(dir_path, exist_ok=True)
    for i, url in enumerate(image_urls, 1):
        try:
            parsed_url = urlparse(url)
            file_ext = os.path.splitext(parsed_url.path)[1] or '.png'
            filename = os.path.join(dir_path, f"cover_{i}{file_ext}")
            response = requests.get(url, stream=True)
            if response.status_code == 200:
                with open(filename, 'wb') as f:
                    for chunk in response.iter_content(chunk_size=8192):
                        f.write(chunk)
                print(f"已保存封面: {filename}")
            else:
                print(f"下载失败 {url}: HTTP {response.status_code}")
        except Exception as e:
            print(f"下载失败 {url}: {e}")


if __name__ == '__main__':
    app.run(host='127.0.0.1', port=int(sys.argv[1]))
